"""The GPU procedure stays runnable on a machine without a GPU: the GPU tests themselves on CPU, bench_gpu.py's quick
mode, and the slimmed bitsandbytes wheel `make gpu-wheels` builds (docs/gpu.md)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_wheels import slim_bitsandbytes  # noqa: E402


@pytest.mark.slow
def test_gpu_tests_pass_on_cpu():
    """`pytest -m gpu` on CPU (LORA_OVER_GPU_TESTS_ON_CPU=1): the tests are right before a GPU runs them."""
    env = {**os.environ, "LORA_OVER_GPU_TESTS_ON_CPU": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "8 passed" in done.stdout, done.stdout[-2000:]


@pytest.mark.slow
def test_bench_gpu_quick(tmp_path):
    cmd = [sys.executable, str(ROOT / "benches" / "cost" / "bench_gpu.py"), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    arms = ["lora", "lora-over-1", "lora-over-0.25", "lora-over-dynamic", "cla", "c3la", "glora"]
    assert [r["arm"] for r in result["arms"]] == arms
    assert all(r["steps_timed"] == 2 and r["ops"] > 0 for r in result["arms"])
    assert result["collapse"]["modules"] == 14 and result["collapse"]["max_error"] <= 1e-6
    assert "| lora-over-dynamic |" in (tmp_path / "bench_gpu.md").read_text()


def test_slimmed_bitsandbytes_wheel_keeps_cuda_13_and_a_matching_record(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    files = {
        "bitsandbytes/__init__.py": b"x = 1\n",
        "bitsandbytes/libbitsandbytes_cpu.so": os.urandom(64),
        "bitsandbytes/libbitsandbytes_cuda118.so": os.urandom(64),
        "bitsandbytes/libbitsandbytes_cuda128.so": os.urandom(64),
        "bitsandbytes/libbitsandbytes_cuda130.so": os.urandom(64),
        "bitsandbytes/libbitsandbytes_cuda132.so": os.urandom(64),
        "bitsandbytes-0.50.2.dist-info/RECORD": b"stale\n",
    }
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    slim_bitsandbytes(wheel)
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(archive.namelist())
        record = archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()
        kept = {name: archive.read(name) for name in names}
    assert [n for n in names if n.endswith(".so")] == [
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes/libbitsandbytes_cuda132.so",
    ]
    rows = {line.split(",")[0]: line.split(",")[1:] for line in record}
    assert set(rows) == set(names)
    for name, (digest, size) in rows.items():
        if name.endswith("RECORD"):
            assert (digest, size) == ("", "")
            continue
        expected = base64.urlsafe_b64encode(hashlib.sha256(files[name]).digest()).rstrip(b"=").decode()
        assert kept[name] == files[name] and digest == f"sha256={expected}" and int(size) == len(files[name])


def test_gpu_check_without_wheels_says_what_to_run(tmp_path):
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    (tree / "scripts" / "gpu_check.sh").write_text((ROOT / "scripts" / "gpu_check.sh").read_text())
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=tree, env={**os.environ, "OUT": str(tmp_path / "out")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no wheels in .whl/: run 'make gpu-wheels' where pip works, and carry .whl" in done.stdout
