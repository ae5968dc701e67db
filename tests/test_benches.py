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
    """benches/study/study_regime.py --quick: a tiny BERT through every stage, and the arms that are not a package
    callback (LoRA+, the wide-rank fold) as controls. The checkpoint reported as best is the checkpoint evaluation
    with the best validation score, its test score was measured there, every arm starts from the same function at
    one seed (step 0), the collapsed adapter scores as the last in-training evaluation did, an aux_lr ablation
    reaches the worker as a multiple of the lr, and LoRA+ trains B at the ratio times A's rate."""
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
    cmd += ["--arms", "lora", "lora_over_static", "--extend-edges", "0", "--ablations", "aux_lr 3x"]
    cmd += ["--controls", "loraplus16=0.001", "wide_svd=0.001"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "FAILED" not in done.stderr, done.stderr[-4000:]
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    # 2 arms x 2 lrs at seed 0, seed 1 at each best lr, one ablation, 2 controls x 2 seeds
    assert len(runs) == 11, sorted(runs)
    for name, run in runs.items():
        evals = run["evals"]
        # step 0, every 2 steps up to 4, each epoch (16 rows / batch 4 = 4 steps an epoch, 2 epochs)
        assert [e["step"] for e in evals] == [0, 2, 4, 8], name
        assert [e["checkpoint"] for e in evals] == [False, False, True, True], name
        first_best = max((e for e in evals if e["checkpoint"]), key=lambda e: (e["val_acc"], -e["val_loss"]))
        assert run["best"] == first_best and "test_acc" in first_best and "test_acc" in evals[-1], name
        assert abs(run["collapse_val_diff"]) < 1e-5, (name, run["collapse_val_diff"])
        same_seed = [r for r in runs.values() if r["spec"]["seed"] == run["spec"]["seed"]]
        assert all(abs(r["evals"][0]["val_loss"] - evals[0]["val_loss"]) < 1e-6 for r in same_seed), name
    (aux,) = [run for run in runs.values() if run["spec"]["knobs"].get("aux_lr")]
    assert aux["spec"]["knobs"] == {"aux_lr": 3 * aux["spec"]["lr"]}
    assert aux["train"]["trainable_at_begin"] > runs["lora-lr0.001-s0"]["train"]["trainable_at_begin"]
    plus = runs["loraplus-loraplus_ratio16-lr0.001-s0"]
    groups = {g["lr"]: g for g in plus["train"]["optimizer_groups"]}  # B alone at 16x; A, the head at 1x
    assert sorted(groups) == [0.001, 0.016] and groups[0.016]["tensors"] == groups[0.016]["lora_B"] > 0, groups
    assert groups[0.001]["lora_B"] == 0 and groups[0.001]["tensors"] == groups[0.016]["tensors"] + 2, groups
    wide = runs["lora_wide-lr0.001-s1"]
    assert 0 < wide["last"]["fold_error_mean"] <= wide["last"]["fold_error_max"] < 1, wide["last"]
    assert set(wide["unfolded_last"]) == {"val_acc", "val_loss"}
    assert wide["train"]["trainable_at_begin"] > runs["lora-lr0.001-s1"]["train"]["trainable_at_begin"]
    assert "| aux_lr 3x | 1 |" in done.stdout, done.stdout
    for header in ("## Time-to-target, each arm at its best lr", "## Rank 8 trained, folded to rank 4"):
        assert header in done.stdout, done.stdout
    for picture in ("curves.png", "sweep.png", "ablations.png"):
        assert (out / picture).stat().st_size > 0
