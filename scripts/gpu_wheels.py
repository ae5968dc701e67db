"""The wheels a lent GPU machine lacks (README "On a GPU"), fetched here and unpacked there.

    python scripts/gpu_wheels.py --download .whl            # here (`make gpu-wheels`): pip can reach a registry
    python scripts/gpu_wheels.py --install .whl --target T  # there (`make gpu-check`): no network, no pip needed

The device (one H200; the `device` tool's README) has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17,
accelerate 1.15, peft and safetensors, and no network; the working tree and carried paths may total 64 MiB.
So the wheels are the versions this project's CI runs (read from this environment), for CPython 3.12 on
manylinux x86_64, and bitsandbytes' wheel (43 MB: one kernel library per CUDA release from 11.8 to 13.2) keeps
only the CUDA 13 libraries, which is what torch 2.11's CUDA 13 loads (``bitsandbytes/cextension.py`` picks
``libbitsandbytes_cuda{major}{minor}.so`` from ``torch.version.cuda``). Its RECORD is rewritten to match.

TRL needs datasets, which needs pyarrow (55 MB) and pandas: they do not fit, so the GPU tests train through
transformers' ``Trainer`` (TRL's ``SFTTrainer`` is a subclass; the callbacks are the same), and TRL's own tests
run only where the device has pyarrow and pandas already (``--install`` unpacks TRL's group only then).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import importlib.util
import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

# Beyond what the device has: the training stack, the newer tokenizers/hub that transformers 5.2x needs, pytest.
CORE = ["bitsandbytes", "transformers", "peft", "huggingface-hub", "tokenizers", "safetensors", "regex", "typer"]
TESTS = ["pytest", "pluggy", "iniconfig", "pygments"]
TRL_GROUP = ["trl", "datasets", "dill", "multiprocess", "xxhash", "fsspec"]  # unpacked only beside pyarrow+pandas
KEEP_CUDA = re.compile(r"bitsandbytes/libbitsandbytes_(cuda13\d|cpu)\.so$")


def download(dest: Path) -> None:
    """Every wheel at this environment's version, for CPython 3.12 manylinux x86_64; then slim bitsandbytes."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={md.version(name)}" for name in CORE + TESTS + TRL_GROUP]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    command += ["--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    for tag in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "any"):
        command += ["--platform", tag]
    subprocess.run([*command, "-d", str(dest), *pins], check=True)
    for wheel in dest.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel)
    total = sum(w.stat().st_size for w in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels in {dest}: {total / 2**20:.1f} MiB")


def slim_bitsandbytes(wheel: Path) -> None:
    """Drop every kernel library but CUDA 13's and the CPU one; rewrite RECORD so the wheel stays valid."""
    with zipfile.ZipFile(wheel) as source:
        names = [n for n in source.namelist() if not n.endswith(".so") or KEEP_CUDA.search(n)]
        if len(names) == len(source.namelist()):
            return  # already slim
        files = {n: source.read(n) for n in names}
    record = next(n for n in files if n.endswith(".dist-info/RECORD"))
    lines = []
    for name, data in files.items():
        if name == record:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    files[record] = ("\n".join([*lines, f"{record},,"]) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in files.items():
            target.writestr(name, data)
    wheel.write_bytes(buffer.getvalue())


def install(source: Path, target: Path) -> None:
    """Unpack the wheels into ``target`` (put first on PYTHONPATH); TRL's group only beside pyarrow and pandas."""
    target.mkdir(parents=True, exist_ok=True)
    arrow = all(importlib.util.find_spec(name) for name in ("pyarrow", "pandas"))
    wanted = CORE + TESTS + (TRL_GROUP if arrow else [])
    normalized = {name.replace("-", "_").lower() for name in wanted}
    for wheel in sorted(source.glob("*.whl")):
        if wheel.name.split("-")[0].lower() not in normalized:
            continue
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        print(f"unpacked {wheel.name}")
    if not arrow:
        print("pyarrow/pandas missing on this machine: TRL and datasets not unpacked (their tests skip)")


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--download", type=Path, help="fetch the wheels into this folder")
    parser.add_argument("--install", type=Path, help="unpack the wheels of this folder ...")
    parser.add_argument("--target", type=Path, help="... into this one")
    args = parser.parse_args()
    if args.download:
        download(args.download)
    elif args.install and args.target:
        install(args.install, args.target)
    else:
        parser.error("give --download FOLDER, or --install FOLDER --target FOLDER")


if __name__ == "__main__":
    main()
