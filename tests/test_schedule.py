"""The pure parts of scheduling: budgeted allocation and the sensitivity tracker."""

from __future__ import annotations

import json
import random
import sys

import pytest

from lora_over_trl.lora_over.schedule.allocate import allocate, allocate_levels, module_type
from lora_over_trl.lora_over.schedule.importance import SensitivityTracker


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
    tracker.update({"a": 2.0, "b": 1.0})  # I stays 2; U = 0.5 * 1 + 0.5 * |2 - 2| = 0.5 carries the old spread
    assert tracker.scores() == {"a": 1.0, "b": 0.0}
    assert tracker.updates == 3  # one per optimizer step, whatever the number of modules
    assert SensitivityTracker(uncertainty=False, sensitivity={"a": 3.0}).scores() == {"a": 3.0}
    restored = SensitivityTracker(beta1=0.5, beta2=0.5)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored == tracker


def test_allocation_picture_shows_which_module_held_capacity_when(tmp_path):
    import matplotlib.pyplot as plt

    from lora_over_trl.lora_over.schedule.picture import allocation_matrix, draw_allocation

    history = [
        {"step": 0, "event": "install", "modules": ["model.a", "model.b"]},
        {"step": 2, "event": "reallocate", "modules": ["model.b", "model.c"]},
        {"step": 3, "event": "note"},  # not a decision: no "modules"
    ]
    assert allocation_matrix(history) == (["model.a", "model.b", "model.c"], [0, 2], [[1, 0], [1, 1], [0, 1]])
    levels = [
        {"step": 0, "modules": ["a", "b"], "capacities": {"a": 2.0, "b": 1.0}},
        {"step": 4, "modules": ["b"], "capacities": {"b": 2.0}},
    ]
    assert allocation_matrix(levels) == (["a", "b"], [0, 4], [[1.0, 0.0], [0.5, 1.0]])  # share of the top capacity
    # capacities below 1 are still shares of the top; all zero or none recorded: held or not
    small = [{"step": 0, "modules": ["a", "b"], "capacities": {"a": 0.5, "b": 0.25}}]
    assert allocation_matrix(small) == (["a", "b"], [0], [[1.0], [0.5]])
    assert allocation_matrix([{"step": 0, "modules": ["a"], "capacities": {"a": 0.0}}])[2] == [[1.0]]
    assert allocation_matrix([{"step": 0, "modules": ["a"], "capacities": {}}])[2] == [[1.0]]
    mixed = [{"step": 0, "modules": ["a"]}, {"step": 1, "modules": ["a"], "capacities": {"a": 2.0}}]
    assert allocation_matrix(mixed)[2] == [[1.0, 1.0]]
    assert draw_allocation([{"step": 0, "modules": []}], tmp_path / "nobody.png") is None  # decisions, no module
    assert draw_allocation([{"step": 0, "event": "note"}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    pictures = {}
    for name, held in (("full", ["model.a", "model.b"]), ("empty", [])):
        path = draw_allocation(
            [{"step": 0, "modules": ["model.a", "model.b"]}, {"step": 1, "modules": held}], tmp_path / f"{name}.png"
        )
        pictures[name] = plt.imread(path)[..., :3]
    dark_green = lambda image: ((image[..., 1] - image[..., 0] > 0.2) & (image[..., 0] < 0.2)).mean()  # noqa: E731
    assert dark_green(pictures["full"]) > 1.5 * dark_green(pictures["empty"]) > 0  # held cells are filled
    assert pictures["full"].shape[0] >= 3 * 110 - 1  # at least 3 inches at 110 dpi


def test_allocation_picture_without_matplotlib_warns_and_draws_nothing(tmp_path, monkeypatch, caplog):
    """The callback draws at on_train_end, before the adapter is saved: a missing matplotlib costs the picture,
    with a warning, never the run."""
    from lora_over_trl.lora_over.schedule.picture import draw_allocation

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with caplog.at_level("WARNING", logger="lora_over_trl.lora_over.schedule.picture"):
        assert draw_allocation([{"step": 0, "modules": ["model.a"]}], tmp_path / "heat.png") is None
    assert not (tmp_path / "heat.png").exists()
    assert f"{tmp_path / 'heat.png'} not drawn: matplotlib cannot be imported" in caplog.text


def test_allocation_edges_missing_scores_zero_costs_and_per_type_shares():
    # per type: each type's share follows its total cost (10 + 10 + 20 of 80, twice), then the rest goes by score
    names = [f"model.layers.{i}.{t}" for t in ("q_proj", "k_proj", "v_proj") for i in (0, 1)]
    costs = {n: 20 if "v_proj" in n else 10 for n in names}
    scores = dict(zip(names, [4.0, 5.0, 2.0, 3.0, 1.0, 9.0], strict=True))
    q1, k1, v1 = "model.layers.1.q_proj", "model.layers.1.k_proj", "model.layers.1.v_proj"
    assert allocate(scores, costs, 40, "per_type") == {q1, k1, v1}  # globally: v1, q1, q0
    assert allocate(scores, costs, 40, "global") == {v1, q1, "model.layers.0.q_proj"}
    assert allocate(scores, costs, 40) == allocate(scores, costs, 40, "global")  # the default scope
    # a module without a score counts as 0; a module that cannot be over-parameterized (cost 0) is never chosen
    assert allocate({"a": 0.5}, {"a": 10, "b": 10}, 10) == {"a"}
    assert allocate({"a": 9.0, "b": 1.0}, {"a": 0, "b": 10}, 10) == {"b"}
    assert allocate_levels({"a": 1.0}, {"a": [10, 20, 30], "b": [10, 20, 30]}, 30) == {"a": 3}
    assert allocate_levels({"a": 1.0}, {"a": [0, 0]}, 100) == {}
    assert module_type("lm_head") == "lm_head" and module_type("model.layers.0.mlp.up_proj") == "up_proj"


def test_levels_per_type_keep_each_types_choice_and_follow_scores():
    """Levels per type: each type takes half the budget (equal top costs), spread by score within the type; the
    last pass only adds. Globally the high-scoring type takes it all. Shares here are chosen so that the final
    fill cannot restore a lost choice, and so that the proportional pass, not the fill, decides."""
    costs = {n: [10, 20, 30] for n in ("l.0.v_proj", "l.1.v_proj", "l.0.q_proj", "l.1.q_proj")}
    scores = {"l.0.v_proj": 2.0, "l.1.v_proj": 1.0, "l.0.q_proj": 90.0, "l.1.q_proj": 10.0}  # exact shares
    # v: 30 spread 2:1 -> levels 2 and 1; q: 27 -> level 2, raised to 3 by what q's share has left
    assert allocate_levels(scores, costs, 60, "per_type") == {"l.0.q_proj": 3, "l.0.v_proj": 2, "l.1.v_proj": 1}
    assert allocate_levels(scores, costs, 60, "global") == {"l.0.q_proj": 3, "l.1.q_proj": 3}
    assert allocate_levels(scores, costs, 60) == allocate_levels(scores, costs, 60, "global")
    # scores below 1 and a module without one: shares are exact proportions of the scores (0.5 of 40 each, level
    # 2), which a fill from the best module down would not give (level 3, then 1)
    costs = {n: [10, 20, 30] for n in "abc"}
    assert allocate_levels({"a": 0.5, "b": 0.5}, costs, 40) == {"a": 2, "b": 2}
    # a level that costs 1 is a level: taken by the proportional pass and by the fill
    assert allocate_levels({"a": 1.0, "b": 1.0}, {"a": [1, 2], "b": [1, 2]}, 2) == {"a": 1, "b": 1}
    assert allocate_levels({"a": 0.0}, {"a": [1, 5]}, 3) == {"a": 1}
    # with no score at all, the fill goes by name: a missing score is 0, like an explicit 0
    assert allocate_levels({"a": 0.0}, {"a": [10], "b": [10]}, 10) == {"a": 1}
