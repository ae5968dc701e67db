"""The Axolotl plugin's keys and config-time refusals (pydantic only: Axolotl itself is checked by
``make check-axolotl``, which trains through a real ``axolotl train``)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lora_over_trl.integrations.axolotl.args import KERNEL_KEYS, LoraOverArgs, config_problems, method_config
from lora_over_trl.lora_over.config import LoraOverConfig
from lora_over_trl.methods.cla.config import ClaConfig

FINE = {"adapter": "qlora", **dict.fromkeys(KERNEL_KEYS, False)}

# (extra keys over FINE, the text each problem line must hold; empty: no problem)
CASES = [
    ({}, []),
    ({"lora_over": {"schedule": "dynamic", "budget_ratio": 0.5}}, []),
    ({"lora_over_method": "c3la", "lora_over_cla": {"chain_interval": 5}}, []),
    ({"lora_over_method": "lora", "lora_mlp_kernel": True, "peft_use_dora": True}, []),  # the plugin stays idle
    ({"lora_mlp_kernel": True, "lora_o_kernel": True}, ["lora_mlp_kernel, lora_o_kernel: true"]),
    ({"adapter": "full"}, ["adapter: 'full'"]),
    ({"adapter": None}, ["adapter: None"]),
    ({"peft_use_dora": True}, ["peft_use_dora: True"]),
    ({"relora": True, "loraplus_lr_ratio": 16.0}, ["relora: True", "loraplus_lr_ratio: 16.0"]),
    ({"lora_over_method": "glora"}, ["lora_over_method: 'glora': GLoRA is not offered"]),
    ({"lora_over_method": "cLA"}, ["lora_over_method: 'cLA' is not one of"]),
    ({"lora_over_cla": {"chain_interval": 5}}, ["lora_over_cla: settings given but lora_over_method is 'lora_over'"]),
    ({"lora_over": {"capacity": -1}}, ["lora_over: invalid LoraOverConfig: `capacity`"]),
    ({"lora_over": {"schedule": "weekly"}}, ["lora_over: invalid LoraOverConfig: `schedule` must be one of"]),
    ({"lora_over": {"capcity": 2}}, ["lora_over: unknown LoraOverConfig keys: 'capcity' (did you mean 'capacity'?)"]),
    ({"lora_over_method": "cla", "lora_over_cla": {"method": "rcla"}}, ["lora_over_cla: set the variant"]),
    ({"lora_over": {"collapse_on_train_end": False}}, ["lora_over.collapse_on_train_end: False"]),
    ({"lora_over_method": "rcla", "lora_model_dir": "old"}, ["lora_model_dir: 'old'"]),
]


@pytest.mark.parametrize(("extra", "expected"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_config_problems(extra, expected):
    cfg = {**FINE, **extra}
    problems = config_problems(cfg.get)
    assert len(problems) == len(expected), problems
    for problem, text in zip(problems, expected, strict=True):
        assert text in problem
        assert "\n" not in problem


def test_a_scheduled_run_on_several_processes_needs_nothing_more(monkeypatch):
    # every factor is in the bank from the start: no LoRA weight goes without a gradient in a step
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = {**FINE, "lora_over": {"schedule": "dynamic", "budget_ratio": 0.5}}
    assert config_problems(cfg.get) == []


def test_method_config_builds_the_methods_own_configs():
    assert method_config({}.get) == LoraOverConfig()
    assert method_config({"lora_over_method": "lora"}.get) is None
    built = method_config({"lora_over_method": "rc3la", "lora_over_cla": {"chain_interval": 3}}.get)
    assert built == ClaConfig(method="rc3la", chain_interval=3)


class _AxolotlLike(LoraOverArgs):
    """The plugin's model merged into a config model, as Axolotl's ``merge_input_args`` subclasses it."""

    adapter: str | None = None
    lora_qkv_kernel: bool | None = None


def test_merged_model_refuses_at_validation():
    assert _AxolotlLike.model_validate({"adapter": "lora"}).lora_over_method == "lora_over"
    with pytest.raises(ValidationError, match=r"lora_over_trl plugin: adapter: None .*lora_qkv_kernel: true"):
        _AxolotlLike.model_validate({"lora_qkv_kernel": True})
