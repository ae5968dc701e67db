"""LoraOverConfig: field validation, rule matching, dict round trip."""

from __future__ import annotations

import pytest

from lora_over_trl import CapacityRule, LoraOverConfig
from lora_over_trl.utils.fields import layer_index, module_matches


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as info:
        LoraOverConfig(
            capacity=-1,
            factors="C",
            num_cores=1,
            aux_lr=0.0,
            rules=[{"target_modules": [], "capacity": -2, "layers": [3, 1]}],
        )
    message = str(info.value)
    for field in (
        "`capacity`",
        "`factors`",
        "`num_cores`",
        "`aux_lr`",
        "`rules[0].target_modules`",
        "`rules[0].capacity`",
        "`rules[0].layers`",
    ):
        assert field in message


def test_levels_are_checked():
    with pytest.raises(ValueError, match="`levels` must be an integer >= 1, got 0"):
        LoraOverConfig(schedule="dynamic", budget=10, levels=0)
    with pytest.raises(ValueError, match="`levels` > 1 needs schedule 'prepass' or 'dynamic'"):
        LoraOverConfig(levels=3)
    assert LoraOverConfig(schedule="prepass", budget=10, levels=3).levels == 3


def test_rule_with_unknown_field_names_the_fields():
    with pytest.raises(ValueError, match=r"rules\[0\].*fields: target_modules, capacity, layers"):
        LoraOverConfig(rules=[{"modules": ["q_proj"], "capacity": 1.0}])


def test_first_matching_rule_wins_then_the_default():
    config = LoraOverConfig(
        capacity=0.5,
        rules=[
            {"target_modules": ["q_proj"], "capacity": 2.0, "layers": [1, 2]},
            CapacityRule(target_modules=r".*proj", capacity=1.0),
        ],
    )
    assert config.capacity_of("model.layers.1.self_attn.q_proj") == 2.0
    assert config.capacity_of("model.layers.0.self_attn.q_proj") == 1.0  # layer outside [1, 2]
    assert config.capacity_of("model.layers.0.self_attn.v_proj") == 1.0
    assert config.capacity_of("lm_head") == 0.5


def test_matching_follows_peft():
    assert module_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not module_matches("model.layers.0.self_attn.q_proj_x", ["q_proj"])
    assert module_matches("model.layers.10.mlp.up_proj", r".*\.1\d\.mlp\..*")
    assert not module_matches("model.layers.1.mlp.up_proj", r"mlp")  # a string must match the whole name
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("lm_head") is None


def test_dict_round_trip_and_unknown_keys():
    config = LoraOverConfig(capacity=0.25, rules=[{"target_modules": "v_proj", "capacity": 3.0}], aux_lr=1e-3)
    assert LoraOverConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown LoraOverConfig keys: 'capcity' \(did you mean 'capacity'\?\)"):
        LoraOverConfig.from_dict({"capcity": 1.0})


def test_schedule_phases_are_steps_or_fractions_of_the_run():
    from lora_over_trl import ClaConfig
    from lora_over_trl.utils.fields import resolve_phase

    config = LoraOverConfig(schedule="dynamic", warmup_steps=0.125, interval=4, final_steps=0.25)
    assert config.budget is None and config.budget_ratio is None  # the default budget is the callback's (tested)
    assert [resolve_phase(v, 32) for v in (0.125, 4, 0.25)] == [4, 4, 8]
    assert [resolve_phase(v, 3) for v in (0.125, 4, 0.25)] == [0, 4, 0]  # fractions round down; steps stay
    assert resolve_phase(0.05, 10, minimum=1) == 1 and resolve_phase(0.0, 10) == 0
    assert ClaConfig(method="c3la").chain_interval == 0.25 and ClaConfig(chain_interval=3).chain_interval == 3
    bad = [
        ({"interval": 0.0}, "`interval` must be an integer >= 1 (steps) or a fraction of the run in (0, 1), got 0.0"),
        ({"interval": 1.5}, "`interval` must be an integer >= 1 (steps) or a fraction of the run in (0, 1), got 1.5"),
        ({"warmup_steps": -1}, "`warmup_steps` must be an integer >= 0 (steps) or a fraction of the run in [0, 1)"),
        ({"final_steps": "10%"}, "`final_steps` must be an integer >= 0 (steps) or a fraction of the run in [0, 1)"),
        ({"warmup_steps": 0.6, "final_steps": 0.4}, "`warmup_steps` + `final_steps` (0.6 + 0.4 of the run)"),
        ({"beta1": "high"}, "`beta1` must be a number in [0, 1), got 'high'"),
        ({"uncertainty": "yes"}, "`uncertainty` must be true or false, got 'yes'"),
        ({"seed": -1}, "`seed` must be an integer >= 0, got -1"),
    ]
    for values, message in bad:
        with pytest.raises(ValueError) as info:
            LoraOverConfig(schedule="dynamic", **values)
        assert message in str(info.value)
    with pytest.raises(ValueError, match=r"`chain_interval` must be an integer >= 1 \(steps\) or a fraction"):
        ClaConfig(method="c3la", chain_interval=2.5)
