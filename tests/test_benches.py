"""The benchmark scripts still run: quick, tiny-model passes of benches/cost/, benches/quality/ and benches/study/
(no timings or quality checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each starts the script's own processes


def test_bench_inference_quick():
    cmd = [sys.executable, str(ROOT / "benches" / "cost" / "bench_inference.py"), "--quick", "--section", "all"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for header in (
        "arm                     total params  adapter params   trainable  forward ms",
        "   r  capacity   trainable  x LoRA   step s  x LoRA",
        "   r  modules   LoRA params    aux params  apply s collapse s  max rel err",
    ):
        assert header in done.stdout, done.stdout


def test_bench_methods_quick():
    cmd = [sys.executable, str(ROOT / "benches" / "cost" / "bench_methods.py"), "--quick", "--arms", "c3la", "glora"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    table = done.stdout.split("method ")[-1].splitlines()
    assert [row.split()[0] for row in table[1:4]] == ["lora", "c3la", "glora"], done.stdout


def _quick(script: str, tmp_path) -> str:
    # two runs at a time, as `make bench-quality` runs them (a run's time is mostly its process start)
    cmd = [
        sys.executable,
        str(ROOT / "benches" / "quality" / script),
        "--quick",
        "--jobs",
        "2",
        "--out",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "FAILED" not in done.stderr, done.stderr[-4000:]
    for picture in ("sweep.png", "loss_curves_4.png", "final_4.png"):
        assert (tmp_path / "out" / picture).stat().st_size > 0
    return done.stdout


def test_bench_quality_quick(tmp_path):
    """benches/quality/bench_quality.py --quick: a tiny Llama through sweep and final (no quality checked)."""
    out = _quick("bench_quality.py", tmp_path)
    assert "| method | lr 0.001 | lr 0.01 | best lr |" in out, out
    assert "| method | lr | answer NLL mean ± std | Δ vs lora | verdict |" in out, out
    assert "| lora_over_static |" in out.split("## Final")[-1], out


def test_bench_quality_cls_quick(tmp_path):
    """benches/quality/bench_quality_cls.py --quick: a tiny BERT classifier through sweep and final."""
    out = _quick("bench_quality_cls.py", tmp_path)
    assert "| method | lr 0.001 | lr 0.01 | best lr |" in out, out
    assert "| method | lr | accuracy mean ± std | Δ vs lora | verdict |" in out, out
    assert "| lora_over_static |" in out.split("## Final")[-1], out


def test_study_regime_quick(tmp_path):
    """benches/study/study_regime.py --quick: a tiny BERT through every stage. The checkpoint reported as best is the
    evaluation with the best validation score, its test score was measured there, the collapsed adapter scores
    as the last in-training evaluation did, and an aux_lr ablation reaches the worker as a multiple of the lr."""
    import json

    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "benches" / "study" / "study_regime.py"),
        "--quick",
        "--jobs",
        "2",
        "--out",
        str(out),
    ]
    cmd += ["--methods", "lora", "lora_over_static", "--extend-edges", "0", "--ablations", "aux_lr 3x"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "FAILED" not in done.stderr, done.stderr[-4000:]
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert len(runs) == 7, sorted(runs)  # 2 methods x 2 lrs at seed 0, seed 1 at each best lr, one ablation
    for name, run in runs.items():
        evals = run["evals"]
        assert [e["step"] for e in evals] == [4, 8], name  # 16 rows / batch 4 = 4 steps an epoch, 2 epochs
        first_best = max(evals, key=lambda e: (e["val_acc"], -e["val_loss"]))
        assert run["best"] == first_best and "test_acc" in first_best and "test_acc" in evals[-1], name
        assert abs(run["collapse_val_diff"]) < 1e-5, (name, run["collapse_val_diff"])
    (aux,) = [run for run in runs.values() if run["spec"]["knobs"]]
    assert aux["spec"]["knobs"] == {"aux_lr": 3 * aux["spec"]["lr"]}
    assert aux["train"]["trainable_at_begin"] > runs["lora-lr0.001-s0"]["train"]["trainable_at_begin"]
    assert "| aux_lr 3x | 1 |" in done.stdout, done.stdout
    for picture in ("curves.png", "sweep.png", "ablations.png"):
        assert (out / picture).stat().st_size > 0
