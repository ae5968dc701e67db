"""The study's own computations (benches/study/), checked in process against independent ones: the wide-rank arm's
truncated-SVD fold, the arms' LoRA settings, the confidence intervals and the time-to-target."""

from __future__ import annotations

import copy
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "benches" / "study"))

from benchlib.report import ci95, diff_ci95, verdict95  # noqa: E402
from study_fold import folded, truncate  # noqa: E402
from study_progress import median_steps, paired_steps, seed_mean_curve, steps_to, target_arms, targets  # noqa: E402


def test_truncate_is_the_best_rank_r_approximation():
    """B' A' equals the projection of B A onto its top-r right singular directions (from the eigenvectors of
    (BA)^T BA, in numpy), padded with zeros; the error is the relative Frobenius distance."""
    generator = torch.Generator().manual_seed(random.randrange(2**31))
    rank = 3
    weight_b = torch.randn(12, 2 * rank, generator=generator)
    weight_a = torch.randn(2 * rank, 9, generator=generator)
    new_a, new_b, error = truncate(weight_a, weight_b, rank)
    product = weight_b.double().numpy() @ weight_a.double().numpy()
    _, vectors = np.linalg.eigh(product.T @ product)  # ascending eigenvalues
    top = vectors[:, -rank:]
    best = product @ top @ top.T
    assert np.allclose((new_b @ new_a).double().numpy(), best, atol=1e-5)
    assert math.isclose(error, np.linalg.norm(product - best) / np.linalg.norm(product), rel_tol=1e-5)
    assert not new_b[:, rank:].any() and not new_a[rank:].any()


def test_folded_scores_as_a_rank_r_adapter_and_restores():
    """Inside ``folded`` a rank-2r PEFT model computes what a real rank-r PEFT adapter of the truncated factors
    computes (same scaling), and the trained factors come back bit for bit after."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(random.randrange(2**31))
    rank = 2
    base = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6))

    def adapter(r):
        return get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2"]))

    wide, narrow = adapter(2 * rank), adapter(rank)
    for module in wide.modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight)
    kept = {n: p.detach().clone() for n, p in wide.named_parameters()}
    for module, target in zip(wide.modules(), narrow.modules(), strict=True):
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            new_a, new_b, _ = truncate(module.lora_A["default"].weight, module.lora_B["default"].weight, rank)
            target.lora_A["default"].weight.data.copy_(new_a[:rank])
            target.lora_B["default"].weight.data.copy_(new_b[:, :rank])
    inputs = torch.randn(5, 10)
    with torch.no_grad(), folded(wide, rank) as errors:
        inside = wide(inputs)
    assert len(errors) == 2 and all(0 < e < 1 for e in errors)
    assert torch.allclose(inside, narrow(inputs).detach(), atol=1e-5)
    assert all(torch.equal(p, kept[n]) for n, p in wide.named_parameters())


def test_arm_lora_configs():
    """rsLoRA turns on PEFT's use_rslora; the wide arm trains at twice the rank with alpha twice that (the scaling
    of every other arm); c3LA trains at half the rank."""
    from study_worker import lora_config

    def spec(method):
        return {"method": method, "rank": 8}

    assert lora_config(spec("rslora")).use_rslora and not lora_config(spec("lora")).use_rslora
    wide = lora_config(spec("lora_wide"))
    assert (wide.r, wide.lora_alpha) == (16, 32)
    assert lora_config(spec("c3la")).r == 4 and lora_config(spec("lora_over_static")).r == 8


def test_confidence_intervals_match_scipy_t_tests():
    """ci95: Student's t interval of the mean; diff_ci95: Welch's interval of a difference (scipy's t-tests)."""
    from scipy import stats

    rng = random.Random()
    values = [rng.gauss(0.6, 0.03) for _ in range(5)]
    reference = [rng.gauss(0.62, 0.05) for _ in range(3)]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=0, scale=stats.sem(values))
    assert ci95(values) == pytest.approx(high, rel=1e-9)
    interval = stats.ttest_ind(values, reference, equal_var=False).confidence_interval(0.95)
    assert diff_ci95(values, reference) == pytest.approx((interval.high - interval.low) / 2, rel=1e-9)
    assert math.isnan(ci95([0.5])) and math.isnan(diff_ci95([0.5], reference))


def test_time_to_target():
    """The first evaluated step at or below the target; the median over seeds counts a miss as slowest; targets are
    the lowest loss every LoRA seed reaches and the point halfway to it from step 0; the paired difference against
    LoRA takes the seeds where both reached the target."""

    def run(losses):
        return {"evals": [{"step": 6 * i, "val_loss": loss} for i, loss in enumerate(losses)]}

    runs = [run([0.70, 0.69, 0.66, 0.68]), run([0.70, 0.67, 0.68, 0.69])]
    assert [steps_to(r, 0.675, "val_loss") for r in runs] == [12, 6]
    assert steps_to(runs[1], 0.6, "val_loss") is None
    goal = targets({"lora": (1e-3, runs)}, "val_loss")
    assert goal["LoRA's best"] == pytest.approx(0.67)  # the lowest loss both seeds reach
    assert goal["halfway"] == pytest.approx((0.70 + 0.67) / 2)
    assert median_steps([12, None, 6]) == "12"
    assert median_steps([12, None, None]) == "-"
    assert median_steps([12, 6]) == "9" and median_steps([12, None]) == "-" and median_steps([]) == "-"
    for seed, result in enumerate(runs):
        result["spec"] = {"seed": seed}
    other = [{**run([0.70, 0.66, 0.66, 0.66]), "spec": {"seed": 1}}, {**run([0.66] * 4), "spec": {"seed": 0}}]
    assert paired_steps(other, runs, 0.675, "val_loss") == "-6 (2)"  # seed 1: 6 - 6 = 0, seed 0: 0 - 12 = -12
    assert paired_steps(other, runs, 0.6, "val_loss") == "-"  # nobody reaches it
    curve = seed_mean_curve(runs, "val_loss", until=12)  # the seed mean at each evaluation up to step 12
    assert [step for step, _ in curve] == [0, 6, 12]
    assert [loss for _, loss in curve] == pytest.approx([0.70, 0.68, 0.67])


def test_a_control_without_lora_at_its_lr_is_read_against_lora_at_lora_s():
    """Without a sweep, an arm controlled at its own lr (LoRA+ at a fifth of LoRA's) is still compared with LoRA,
    at the lr LoRA was controlled at, and LoRA there sets the time-to-target's targets."""
    from types import SimpleNamespace

    from study_report import control_arms

    runs = {(arm, lr): [{"arm": arm, "lr": lr, "seed": s} for s in (0, 1)]
            for arm, lr in [("lora", 1e-3), ("lora_over_static", 1e-3), ("loraplus16", 2e-4)]}  # fmt: skip
    args = SimpleNamespace(arms=["lora"], seeds=[0, 1], controls=[("lora", 1e-3), *[(a, lr) for a, lr in runs][1:]])
    controls = control_arms(args, lambda arm, lr, seeds: runs.get((arm, lr), []))
    assert list(controls) == [2e-4, 1e-3]
    assert controls[2e-4] == {"lora": (1e-3, runs["lora", 1e-3]), "loraplus16": (2e-4, runs["loraplus16", 2e-4])}
    assert list(controls[1e-3]) == ["lora", "lora_over_static"]
    assert target_arms({}, controls)["lora"] == (1e-3, runs["lora", 1e-3])
    finals = {"lora": (5e-4, runs["lora", 1e-3])}
    assert target_arms(finals, controls) is finals  # a sweep's best lr wins
    alone = SimpleNamespace(arms=[], seeds=[0, 1], controls=[("loraplus16", 2e-4)])  # no LoRA anywhere
    assert list(control_arms(alone, lambda arm, lr, seeds: runs.get((arm, lr), []))[2e-4]) == ["loraplus16"]


def test_sweep_extends_an_edge_along_the_series():
    """An arm whose best lr is at an edge gets the next lr of the series beyond it, ``extend_edges`` times; every
    (arm, lr) runs once; an arm with its best inside its grid is not extended."""
    from benchlib.runs import sweep_lrs

    peak = {"a": 5e-3, "b": 1.5e-3}
    calls = []

    def run(todo):
        calls.extend(todo)
        return [{"score": -abs(math.log(lr / peak[arm]))} for arm, lr in todo]

    def best(results):
        return max(results, key=lambda lr: results[lr]["score"])

    grids = {"a": [1e-3, 2e-3], "b": [1e-3, 1.5e-3, 2e-3]}
    table = sweep_lrs(["a", "b"], grids, 2, run, best, lambda message: None, (1, 1.5, 2, 3, 5, 7))
    assert sorted(table["a"]) == [1e-3, 2e-3, 3e-3, 5e-3]
    assert sorted(table["b"]) == [1e-3, 1.5e-3, 2e-3]
    assert len(calls) == len(set(calls)) == 7


def test_verdict_needs_the_interval_and_the_item_floor():
    """beyond noise only when the 95% CI of the difference excludes 0 and, for accuracies, the difference exceeds
    twice the standard error of two proportions over the test items."""
    values, reference = [0.62, 0.63, 0.64], [0.60, 0.61, 0.60]
    diff, half, verdict = verdict95(values, reference)
    assert diff == pytest.approx(0.0267, abs=1e-4) and half == pytest.approx(diff_ci95(values, reference))
    assert verdict == "beyond noise" and 0 < half < diff
    assert verdict95(values, reference, items=1000)[2] == "within noise"  # 2 * sqrt(2 p (1-p) / 1000) = 0.043
    assert verdict95(values, reference, items=100000)[2] == "beyond noise"
    assert verdict95([0.61, 0.65], [0.60, 0.64])[2] == "within noise"
    assert verdict95([0.6], reference)[2] == "n<2"
