"""staged_directory and write_json: a whole output folder or file, or nothing."""

from __future__ import annotations

import json

import pytest

from lora_over_trl.utils.atomic import staged_directory, write_json


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


def test_write_json_replaces_the_whole_file_and_leaves_no_staging(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"a": 1, "nested": {"b": [1, 2]}})
    write_json(path, {"c": tmp_path}, indent=1)  # not JSON-native: written as its string
    assert json.loads(path.read_text()) == {"c": str(tmp_path)}
    assert path.read_text() == json.dumps({"c": str(tmp_path)}, indent=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
