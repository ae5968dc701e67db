"""The pure parts of scheduling: budgeted allocation and the sensitivity tracker."""

from __future__ import annotations

import json
import random

import pytest

from lora_over_trl.schedule import SensitivityTracker, allocate, allocate_levels, module_type


def brute_force_best(scores, costs, budget):
    """Best total score of any subset within the budget (exponential; small cases only)."""
    names = list(costs)
    best = 0.0
    for mask in range(1 << len(names)):
        subset = [n for i, n in enumerate(names) if mask >> i & 1]
        if sum(costs[n] for n in subset) <= budget:
            best = max(best, sum(scores[n] for n in subset))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_allocation_never_exceeds_the_budget_and_takes_by_score(seed):
    rng = random.Random(seed)
    names = [f"model.layers.{i}.{t}" for i in range(4) for t in ("q_proj", "v_proj")]
    costs = {n: rng.randint(1, 100) for n in names}
    scores = {n: rng.random() for n in names}
    budget = rng.randint(50, 400)
    for scope in ("global", "per_type"):
        chosen = allocate(scores, costs, budget, scope)
        assert sum(costs[n] for n in chosen) <= budget
        left = budget - sum(costs[n] for n in chosen)
        assert all(costs[n] > left for n in names if n not in chosen)  # nothing else would still fit
    chosen = allocate(scores, costs, budget, "global")
    # with equal costs greedy-by-score is optimal; in general it is the OPF-style top-N, not a knapsack solver
    equal = dict.fromkeys(names, 10)
    assert sum(scores[n] for n in allocate(scores, equal, budget, "global")) == pytest.approx(
        brute_force_best(scores, equal, budget)
    )
    assert chosen == allocate(scores, costs, budget, "global")  # deterministic


def test_per_type_spreads_capacity_over_types():
    names = [f"model.layers.{i}.{t}" for i in range(4) for t in ("q_proj", "v_proj")]
    costs = dict.fromkeys(names, 10)
    scores = {n: (10.0 if "q_proj" in n else 1.0) + i for i, n in enumerate(names)}
    assert {module_type(n) for n in allocate(scores, costs, 40, "global")} == {"q_proj"}
    assert [module_type(n) for n in sorted(allocate(scores, costs, 40, "per_type"))].count("v_proj") == 2
    assert allocate(scores, costs, 5, "global") == set()  # a budget below every module holds none


@pytest.mark.parametrize("seed", range(20))
def test_levels_stay_within_budget_and_follow_the_scores(seed):
    rng = random.Random(seed)
    names = [f"model.layers.{i}.{t}" for i in range(5) for t in ("q_proj", "v_proj", "down_proj")]
    sizes = {n: rng.choice([8, 16, 40]) for n in names}
    costs = {n: [sizes[n] * k for k in (1, 2, 3)] for n in names}  # cost grows with the level
    scores = {n: rng.expovariate(1.0) for n in names}
    budget = rng.randint(60, 600)
    for scope in ("global", "per_type"):
        chosen = allocate_levels(scores, costs, budget, scope)
        spent = sum(costs[n][level - 1] for n, level in chosen.items())
        assert spent <= budget and all(1 <= level <= 3 for level in chosen.values())
        left = budget - spent
        # nothing could still be raised one level
        assert all(costs[n][0] > left for n in names if n not in chosen)
        assert all(costs[n][level] - costs[n][level - 1] > left for n, level in chosen.items() if level < 3)
    chosen = allocate_levels(scores, costs, budget, "global")
    assert chosen == allocate_levels(scores, costs, budget, "global")  # deterministic
    # among modules of one size, a higher score never holds a lower level
    for size in set(sizes.values()):
        same = sorted((n for n in names if sizes[n] == size), key=lambda n: -scores[n])
        levels = [chosen.get(n, 0) for n in same]
        assert levels == sorted(levels, reverse=True), (size, levels)


def test_levels_spread_the_budget_by_importance():
    names = [f"model.layers.{i}.q_proj" for i in range(4)]
    costs = {n: [10, 20, 30] for n in names}
    scores = dict(zip(names, [6.0, 3.0, 2.0, 1.0], strict=True))
    # shares 30, 15, 10, 5 -> levels 3, 1, 1, none; the 10 left raise the second best one level
    assert allocate_levels(scores, costs, 60) == {names[0]: 3, names[1]: 2, names[2]: 1}
    assert allocate_levels(dict.fromkeys(names, 0.0), costs, 60) == {names[0]: 3, names[1]: 3}  # no scores: in order
    assert allocate_levels(scores, costs, 5) == {}


def test_tracker_follows_adalora_and_round_trips_through_json():
    tracker = SensitivityTracker(beta1=0.5, beta2=0.5)
    tracker.update({"a": 4.0, "b": 1.0})
    tracker.update({"a": 0.0, "b": 1.0})
    # I = 0.5 * 4 + 0.5 * 0 = 2; U = 0.5 * 0 + 0.5 * |0 - 2| = 1 -> score 2; b is constant: U = 0 -> score 0
    assert tracker.sensitivity == {"a": 2.0, "b": 1.0} and tracker.scores() == {"a": 2.0, "b": 0.0}
    assert SensitivityTracker(uncertainty=False, sensitivity={"a": 3.0}).scores() == {"a": 3.0}
    restored = SensitivityTracker(beta1=0.5, beta2=0.5)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored == tracker
