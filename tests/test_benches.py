"""The benchmark scripts still run: a quick, tiny-model pass of benches/bench_inference.py (no timings checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_inference_quick():
    cmd = [sys.executable, str(ROOT / "benches" / "bench_inference.py"), "--quick", "--section", "all"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for header in (
        "arm                     total params  adapter params   trainable  forward ms",
        "   r  capacity   trainable  x LoRA   step s  x LoRA",
        "   r  modules   LoRA params    aux params  apply s collapse s  max rel err",
    ):
        assert header in done.stdout, done.stdout


def test_bench_methods_quick():
    cmd = [sys.executable, str(ROOT / "benches" / "bench_methods.py"), "--quick", "--arms", "c3la", "glora"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    table = done.stdout.split("method ")[-1].splitlines()
    assert [row.split()[0] for row in table[1:4]] == ["lora", "c3la", "glora"], done.stdout
