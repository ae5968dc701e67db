"""staged_directory: a whole output folder or nothing."""

from __future__ import annotations

import pytest

from lora_over_trl.utils.atomic import staged_directory


def test_failure_leaves_nothing_and_success_replaces(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"), staged_directory(target) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with staged_directory(target) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(FileExistsError, match="exists and is not empty"), staged_directory(target):
        pass
    with staged_directory(target, overwrite=True) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
