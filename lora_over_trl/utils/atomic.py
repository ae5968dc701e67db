"""Write a whole output folder or file, or nothing: stage it beside the target, then rename it into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["staged_directory", "write_json"]


@contextmanager
def staged_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``target``, on any error it is removed.

    An interrupted write therefore never leaves a half-written ``target`` that looks complete.

    Raises:
        FileExistsError: ``target`` exists and is not empty, and ``overwrite`` is false.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose another path or allow overwriting")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, payload: dict[str, Any], *, indent: int = 2) -> None:
    """Replace ``path`` with ``payload`` as indented JSON, whole: a crash leaves the old file or the new one."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(payload, indent=indent, default=str))
    os.replace(staging, path)
