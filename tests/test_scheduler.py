"""The capacity scheduler without a Trainer or a model: budget, reserve, phases, decisions, state."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from lora_over_trl.lora_over.config import LoraOverConfig
from lora_over_trl.lora_over.schedule.scheduler import CapacityScheduler, resolve_phases
from lora_over_trl.utils.callbacks import ScheduleSetupError

TYPES = ("q_proj", "v_proj", "down_proj")


def random_modules(rng: random.Random, layers: int, levels: int) -> dict[str, list[int]]:
    """Per-level auxiliary costs of random modules (growing with the level)."""
    names = [f"model.layers.{i}.{t}" for i in range(layers) for t in TYPES]
    costs = {}
    for name in names:
        base = rng.randint(5, 60)
        costs[name] = sorted(base * k + rng.randint(0, 9) for k in range(1, levels + 1))
    return costs


def spent(costs: dict[str, list[int]], capacities: list[float], chosen: dict[str, float]) -> int:
    return sum(costs[name][capacities.index(capacity)] for name, capacity in chosen.items())


@pytest.mark.parametrize("seed", range(5))
def test_budget_defaults_to_half_of_every_module_at_capacity_and_follows_the_rules(seed):
    rng = random.Random(seed)
    costs = random_modules(rng, 3, 2)
    everything = sum(level[-1] for level in costs.values())  # every module at `capacity` (its top level)
    for schedule in ("prepass", "dynamic"):
        config = LoraOverConfig(schedule=schedule, levels=2)
        assert CapacityScheduler(config, costs).budget == everything // 2
    lora_params = rng.randint(10_000, 50_000)
    ratio = rng.uniform(0.1, 0.9)
    config = LoraOverConfig(schedule="dynamic", budget_ratio=ratio)
    assert CapacityScheduler(config, costs, lora_params).budget == int(ratio * lora_params)
    given = rng.randint(everything // 4, everything)
    assert CapacityScheduler(LoraOverConfig(schedule="prepass", budget=given), costs).budget == given
    assert CapacityScheduler(LoraOverConfig(), costs).budget is None  # static without a budget: no limit
    unsized = CapacityScheduler(LoraOverConfig(schedule="dynamic"))  # a callback's, before on_init_end
    assert (unsized.budget, unsized.costs, unsized.reserve, unsized.history) == (None, {}, 0, [])


def test_a_budget_below_the_cheapest_module_is_refused():
    costs = {"a.q_proj": [40, 90], "b.q_proj": [30, 70], "c.v_proj": [0, 50]}  # c stays plain at the lower level
    with pytest.raises(
        ScheduleSetupError, match=r"a budget of 29 auxiliary parameters holds no module at capacity 0\.5"
    ):
        CapacityScheduler(LoraOverConfig(schedule="dynamic", levels=2, budget=29), costs)
    assert CapacityScheduler(LoraOverConfig(schedule="dynamic", levels=2, budget=30), costs).budget == 30
    with pytest.raises(ScheduleSetupError, match=r"holds no module at capacity 1 \(the cheapest needs 0\)"):
        CapacityScheduler(LoraOverConfig(schedule="prepass", budget=10), {"a.q_proj": [0]})


def best_allocation(costs, budget) -> int:
    """Most auxiliary parameters of any choice the schedule can make within ``budget`` (exhaustive: a module holds at
    most one level)."""
    names = list(costs)
    best = 0
    for pick in itertools.product(*[range(len(costs[n]) + 1) for n in names]):  # 0: not chosen, k: level k
        spend = sum(costs[n][k - 1] for n, k in zip(names, pick, strict=True) if k)
        if spend <= budget:
            best = max(best, spend)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_the_reserve_holds_every_allocation_within_the_budget(seed):
    # every factor is in the bank (plain ones as one core): an allocation needs the LoRA weights' elements plus
    # its auxiliary parameters
    rng = random.Random(100 + seed)
    costs = random_modules(rng, 1, 2)  # 3 modules x 2 levels: 9 allocations
    costs["model.layers.0.v_proj"][0] = 0  # a module that stays plain at its lower level
    lora_params = rng.randint(1_000, 5_000)
    budget = rng.randint(20, sum(c[-1] for c in costs.values()))
    for schedule in ("prepass", "dynamic"):
        reserve = CapacityScheduler(
            LoraOverConfig(schedule=schedule, levels=2, budget=budget), costs, lora_params
        ).reserve
        assert lora_params + best_allocation(costs, budget) <= reserve <= lora_params + budget
    everything = sum(max(c) for c in costs.values())
    roomy = CapacityScheduler(LoraOverConfig(schedule="dynamic", levels=2, budget=10**9), costs, lora_params)
    assert roomy.reserve == lora_params + everything == lora_params + best_allocation(costs, 10**9)
    # a static run installs what it keeps once: nothing to reserve
    assert CapacityScheduler(LoraOverConfig(budget=budget), costs, lora_params).reserve == 0


@pytest.mark.parametrize("max_steps", [10, 37, 200, 1000])
def test_fractional_phases_resolve_against_the_run_and_due_follows_them(max_steps):
    config = LoraOverConfig(schedule="dynamic", budget_ratio=0.5, warmup_steps=0.1, interval=0.05, final_steps=0.2)
    warmup, interval, last = resolve_phases(config, max_steps)
    assert warmup == max_steps // 10
    assert interval == max(1, max_steps // 20)
    assert last == max_steps - max_steps // 5
    scheduler = CapacityScheduler(config, {"a.q_proj": [5]}, 100)
    assert scheduler.phases == (0, 1, 0)  # until the run's length is known
    scheduler.start(max_steps)
    assert scheduler.phases == (warmup, interval, last)
    due = [step for step in range(max_steps + 1) if scheduler.due(step)]
    expected, step = [], warmup
    while step < last:
        expected.append(step)
        step += interval
    assert due == expected and due[0] == warmup and due[-1] < last


def test_absolute_phases_and_other_schedules():
    config = LoraOverConfig(schedule="dynamic", budget_ratio=0.5, warmup_steps=3, interval=4, final_steps=2)
    scheduler = CapacityScheduler(config, {"a.q_proj": [5]}, 100)
    scheduler.start(20)
    assert scheduler.phases == (3, 4, 18)
    assert [s for s in range(25) if scheduler.due(s)] == [3, 7, 11, 15]
    for schedule in ("static", "prepass"):
        other = CapacityScheduler(LoraOverConfig(schedule=schedule, budget=50), {"a.q_proj": [5]})
        other.start(20)
        assert other.phases == (0, 1, 0) and not any(other.due(s) for s in range(25))


def test_a_warmup_beyond_the_run_is_refused():
    config = LoraOverConfig(schedule="dynamic", budget_ratio=0.5, warmup_steps=8, final_steps=2)
    assert resolve_phases(config, 11)[0] == 8  # 8 < 11 - 2: one step left
    with pytest.raises(ScheduleSetupError, match=r"`warmup_steps`=8 leaves no re-allocation before step 8"):
        resolve_phases(config, 10)
    scheduler = CapacityScheduler(config, {"a.q_proj": [5]}, 100)
    with pytest.raises(ScheduleSetupError, match="give the phases as fractions of the run"):
        scheduler.start(10)


def greedy(scores: dict[str, float], costs: dict[str, int], budget: int) -> set[str]:
    """Modules by score (ties by name) while they fit: the documented global rule, written out again."""
    chosen, left = set(), budget
    for name in sorted(costs, key=lambda n: (-scores[n], n)):
        if 0 < costs[name] <= left:
            chosen.add(name)
            left -= costs[name]
    return chosen


@pytest.mark.parametrize("seed", range(10))
def test_choose_spends_within_the_budget_by_score(seed):
    rng = random.Random(200 + seed)
    costs = random_modules(rng, 4, 3)
    scores = {name: rng.expovariate(1.0) for name in costs}
    budget = rng.randint(100, sum(c[-1] for c in costs.values()))
    leveled = CapacityScheduler(LoraOverConfig(schedule="dynamic", levels=3, capacity=1.5, budget=budget), costs)
    assert leveled.capacities == [0.5, 1.0, 1.5]
    chosen = leveled.choose(scores)
    assert chosen and set(chosen.values()) <= {0.5, 1.0, 1.5}
    left = budget - spent(costs, leveled.capacities, chosen)
    assert left >= 0
    assert all(costs[n][0] > left for n in costs if n not in chosen)  # nothing else fits, even at the lowest level
    for name, capacity in chosen.items():  # and no chosen module could still go up a level
        level = leveled.capacities.index(capacity)
        assert level == 2 or costs[name][level + 1] - costs[name][level] > left
    # one level: the greedy rule, at `capacity`
    top = {name: levels[-1] for name, levels in costs.items()}
    one_level = {name: [cost] for name, cost in top.items()}
    single = CapacityScheduler(LoraOverConfig(schedule="dynamic", capacity=1.5, budget=budget), one_level)
    assert single.choose(scores) == dict.fromkeys(greedy(scores, top, budget), 1.5)


@pytest.mark.parametrize("seed", range(5))
def test_the_seeded_first_choice_is_the_same_in_every_instance(seed):
    costs = random_modules(random.Random(300 + seed), 4, 2)
    budget = sum(c[-1] for c in costs.values()) // 3
    config = LoraOverConfig(schedule="dynamic", levels=2, budget=budget, seed=seed)
    first, second = (CapacityScheduler(config, dict(reversed(costs.items()))).initial() for _ in range(2))
    assert first == second and first  # the same, whatever order the modules came in
    assert first == CapacityScheduler(config, costs).initial()
    assert spent(costs, [0.5, 1.0], first) <= budget


def test_plan_names_the_modules_that_move():
    scheduler = CapacityScheduler(LoraOverConfig(schedule="dynamic", levels=2, budget=100), {"a.q_proj": [5, 9]})
    scheduler.current = {"b": 1.0, "a": 0.5, "c": 1.0, "d": 0.5}
    assert scheduler.plan({"e": 1.0, "a": 1.0, "c": 1.0, "d": 0.5, "f": 0.5}) == (["b"], ["e", "f"], ["a"])
    assert scheduler.plan(dict(scheduler.current)) == ([], [], [])


def test_history_logs_and_summary(caplog):
    config = LoraOverConfig(schedule="dynamic", levels=2, budget=100, warmup_steps=2, interval=3, final_steps=1)
    scheduler = CapacityScheduler(config, {"a.q_proj": [5, 9], "b.v_proj": [4, 8]})
    scheduler.start(12)
    scheduler.current = {"a.q_proj": 1.0, "b.v_proj": 0.5}
    with caplog.at_level("INFO", logger="lora_over_trl.lora_over.callback"):
        scheduler.record(0, "initial", ["a.q_proj", "b.v_proj"], 13)
        entry = scheduler.record(2, "reallocate", ["a.q_proj"], 9, leaving=["b.v_proj"], entering=[], resized={})
    assert list(entry) == [
        "step",
        "event",
        "modules",
        "aux_params",
        "budget",
        "leaving",
        "entering",
        "resized",
        "capacities",
    ]
    assert entry["capacities"] == {"a.q_proj": 1.0} and scheduler.history[-1] is entry
    assert caplog.messages == [
        "LoRA-Over initial at step 0: 2 modules, 13 auxiliary params (budget 100)",
        "LoRA-Over reallocate at step 2: 1 modules, 9 auxiliary params (budget 100), -1 +0",
    ]
    assert scheduler.log_values() == {"lora_over/aux_params": 9, "lora_over/modules": 1, "lora_over/moved": 1}
    scheduler.record(5, "reallocate", ["a.q_proj"], 5, leaving=[], entering=[], resized={"a.q_proj": 2e-7})
    assert scheduler.log_values()["lora_over/shrink_error"] == 2e-7 and scheduler.log_values()["lora_over/resized"] == 1
    scheduler.record_collapse(12, 3e-7)
    assert scheduler.history[-1] == {"step": 12, "event": "collapse", "max_error": 3e-7}
    assert scheduler.summary() == {
        "schedule": "dynamic",
        "budget": 100,
        "reallocations": 2,
        "phases": {"warmup": 2, "interval": 3, "last": 11},
        "aux_params_last": 5,
    }
    static = CapacityScheduler(LoraOverConfig(), {"a.q_proj": [5]})
    static.record(0, "initial", ["a.q_proj"], 5)
    assert static.log_values() == {} and static.summary()["phases"] is None
    assert "capacities" not in static.history[-1]  # one level: the modules say it all


def test_a_checkpoint_written_before_the_split_resumes_and_is_written_back_alike():
    """``lora_over_scheduler.json`` as LoRA-Over 0.2.0's callback wrote it: read, and the same bytes written back."""
    written = (
        '{"tracker": {"sensitivity": {"m.q_proj": 0.25, "m.v_proj": 1.5}, "spread": {"m.q_proj": 0.125, '
        '"m.v_proj": 0.0625}, "updates": 4}, "history": [{"step": 0, "event": "initial", "modules": ["m.q_proj"], '
        '"aux_params": 96, "budget": 200, "capacities": {"m.q_proj": 0.5}}, {"step": 2, "event": "reallocate", '
        '"modules": ["m.q_proj", "m.v_proj"], "aux_params": 180, "budget": 200, "leaving": [], "entering": '
        '["m.v_proj"], "resized": {"m.q_proj": 0.0}, "capacities": {"m.q_proj": 1.0, "m.v_proj": 0.5}, '
        '"seconds": 0.0123}], "fresh": {"0": [[0, 64]]}}'
    )
    config = LoraOverConfig(schedule="dynamic", levels=2, budget=200, beta1=0.5, beta2=0.75)
    scheduler = CapacityScheduler(config, {"m.q_proj": [96, 150], "m.v_proj": [84, 130]})
    state = json.loads(written)
    scheduler.load_state_dict(state)
    assert scheduler.current == {"m.q_proj": 1.0, "m.v_proj": 0.5}
    assert scheduler.tracker.scores() == {"m.q_proj": 0.25 * 0.125, "m.v_proj": 1.5 * 0.0625}
    assert json.dumps({**scheduler.state_dict(), "fresh": state["fresh"]}) == written
    # the tracker goes on from the saved EMA: s = 1.0 moves the sensitivity by (1 - beta1) of the gap
    scheduler.tracker.update({"m.q_proj": 1.0})
    assert scheduler.tracker.sensitivity["m.q_proj"] == pytest.approx(0.5 * 0.25 + 0.5 * 1.0)
    assert scheduler.tracker.updates == 5
    # one level: a history without capacities means every listed module at `capacity`
    single = CapacityScheduler(LoraOverConfig(schedule="dynamic", capacity=2.0, budget=200), {"m.q_proj": [96]})
    single.load_state_dict({"tracker": state["tracker"], "history": [{"step": 0, "modules": ["m.v_proj"]}, {"x": 1}]})
    assert single.current == {"m.v_proj": 2.0}


@pytest.mark.parametrize("seed", range(3))
def test_state_round_trips_through_json(seed):
    rng = random.Random(400 + seed)
    costs = random_modules(rng, 3, 2)
    config = LoraOverConfig(schedule="dynamic", levels=2, budget=sum(c[-1] for c in costs.values()) // 2, seed=seed)
    scheduler = CapacityScheduler(config, costs)
    scheduler.current = scheduler.initial()
    scheduler.record(0, "initial", sorted(scheduler.current), spent(costs, [0.5, 1.0], scheduler.current))
    for step in range(1, 4):
        scheduler.tracker.update({name: rng.expovariate(1.0) for name in costs})
        targets = scheduler.choose(scheduler.tracker.scores())
        leaving, entering, _ = scheduler.plan(targets)
        scheduler.current = targets
        aux = spent(costs, [0.5, 1.0], targets)
        scheduler.record(step, "reallocate", sorted(targets), aux, leaving=leaving, entering=entering, resized={})
    text = json.dumps(scheduler.state_dict())
    restored = CapacityScheduler(config, costs)
    restored.load_state_dict(json.loads(text))
    assert json.dumps(restored.state_dict()) == text
    assert restored.current == scheduler.current
    assert restored.tracker.scores() == scheduler.tracker.scores()
    assert restored.choose(restored.tracker.scores()) == scheduler.choose(scheduler.tracker.scores())
