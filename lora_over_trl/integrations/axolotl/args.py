"""The Axolotl YAML keys of :class:`~lora_over_trl.integrations.axolotl.LoraOverPlugin`, and the checks on them.

Axolotl merges this pydantic model into its own config model (``get_input_args``), so the keys sit at the top
level of the YAML next to ``adapter:``, ``lora_r:`` ...; the after-validator below then sees the whole
validated config (with the LoRA kernels Axolotl switched on by itself) and refuses, before any model is
loaded, the settings under which the methods would be silently wrong. Only pydantic and this package are
imported here: the keys and their checks are testable without Axolotl.

    lora_over_method: lora_over         # lora_over | lora | cla | rcla | c3la | rc3la (the recipes' `method:`)
    lora_over:                          # LoraOverConfig fields (the recipes' `lora_over:` section)
      schedule: dynamic
      budget_ratio: 0.5
    lora_over_cla:                      # ClaConfig fields (the recipes' `cla:` section)
      chain_interval: 10
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field, model_validator

from lora_over_trl.lora_over.config import LoraOverConfig
from lora_over_trl.methods.cla.config import ClaConfig
from lora_over_trl.registry import METHODS as REGISTRY
from lora_over_trl.registry import build_config
from lora_over_trl.utils.errors import one_line

__all__ = ["LoraOverArgs", "config_problems", "method_config"]

METHODS = tuple(name for name, method in REGISTRY.items() if method.axolotl_refusal is None)
SECTION_KEYS = {name: method.axolotl_section for name, method in REGISTRY.items() if method.axolotl_section}
ADAPTERS = ("lora", "qlora")
KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
# Axolotl settings under which a method would be silently wrong: key -> why. Each is refused when set truthy.
REFUSED = {
    "peft_use_dora": "DoRA's magnitude vector is outside the LoRA factors the methods re-parameterize and collapse",
    "relora": "ReLoRA merges the adapter into the base weights during training, over-parameterized factors included",
    "qat": "QAT swaps the linear layers for fake-quantized ones that the LoRA factors no longer wrap as PEFT's",
    "nvfp4_merge_aware": "it trains against merged quantized weights instead of PEFT's LoRA forward",
    "flash_attn_fuse_mlp": "the fused SwiGLU MLP reads the base weights directly and skips PEFT's LoRA forward",
    "loraplus_lr_ratio": "LoRA+ builds its optimizer groups from parameter names, which the factors' cores change",
    "lora_target_parameters": "wrapped MoE experts train with these methods through the SFT command or a script, "
    "but the plugin has not been checked with Axolotl's MoE loading (make check-axolotl covers a dense model)",
    "rl": "the plugin is built and tested for supervised fine-tuning; RL trainers build their own adapter",
}


class LoraOverArgs(BaseModel):
    """The plugin's keys in an Axolotl YAML (enable the plugin with ``plugins:``)."""

    lora_over_method: str = Field(
        default="lora_over",
        description="lora_over (over-parameterized factors, collapsed at the end), lora (plain LoRA, plugin idle), "
        "cla / rcla (A a fixed column window, random offset for rcla), c3la / rc3la (chained windows)",
    )
    lora_over: dict[str, Any] | None = Field(
        default=None,
        description="LoRA-Over settings, LoraOverConfig fields: capacity, rules, schedule (static, prepass, "
        "dynamic), budget / budget_ratio, levels, interval, warmup_steps, final_steps, aux_lr ...",
    )
    lora_over_cla: dict[str, Any] | None = Field(
        default=None, description="cLA-family settings, ClaConfig fields: chain_interval, chain_unit, seed"
    )

    @model_validator(mode="after")
    def _check_lora_over(self) -> LoraOverArgs:
        problems = config_problems(lambda key: getattr(self, key, None))
        if problems:
            raise ValueError("lora_over_trl plugin: " + "; ".join(problems))
        return self


def method_config(get: Callable[[str], Any]) -> LoraOverConfig | ClaConfig | None:
    """The method's config from the plugin keys (``None`` for plain LoRA), built by its own ``from_dict``.

    Args:
        get: reads a config value by key (a validated Axolotl config, a dict's ``get``).

    Raises:
        ValueError: one line naming the key, showing the value and saying what is allowed.
    """
    method = get("lora_over_method") or "lora_over"
    refused = REGISTRY[method].axolotl_refusal if method in REGISTRY else None
    if refused:
        label = REGISTRY[method].label
        raise ValueError(f"lora_over_method: {method!r}: {label} is not offered through Axolotl: {refused}")
    if method not in METHODS:
        raise ValueError(f"lora_over_method: {method!r} is not one of {list(METHODS)}")
    section = SECTION_KEYS.get(method)
    for key in sorted(set(SECTION_KEYS.values()) - {section}):
        if get(key):
            raise ValueError(f"{key}: settings given but lora_over_method is {method!r}; remove them or change it")
    if section is None:
        return None
    values = dict(get(section) or {})
    try:
        if REGISTRY[method].variant and "method" in values:
            raise ValueError(f"set the variant with `lora_over_method`, not inside `{section}`")
        config = build_config(method, values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{section}: {one_line(err)}") from err
    if not config.collapse_on_train_end:
        raise ValueError(
            f"{section}.collapse_on_train_end: False would leave a non-standard adapter in Axolotl's output folder; "
            "remove it (the plugin always collapses to a standard PEFT LoRA adapter)"
        )
    return config


def config_problems(get: Callable[[str], Any]) -> list[str]:
    """Every reason the plugin keys, or the Axolotl settings around them, cannot train correctly (empty: fine).

    Args:
        get: reads a config value by key.

    Returns:
        One line per problem, naming the key and its value and saying what to change.
    """
    try:
        method_config(get)  # its own checks: one line per bad key
    except ValueError as err:
        return [str(err)]
    if get("lora_over_method") == "lora":
        return []  # the plugin adds nothing: Axolotl's own LoRA, whatever its settings
    method = get("lora_over_method") or "lora_over"
    problems = []
    adapter = get("adapter")
    if adapter not in ADAPTERS:
        problems.append(f"adapter: {adapter!r} is not allowed with lora_over_method {method!r}; use one of {ADAPTERS}")
    kernels = [key for key in KERNEL_KEYS if get(key)]
    if kernels:
        problems.append(
            f"{', '.join(kernels)}: true (Axolotl turns them on when unset); its fused LoRA kernels compute the "
            f"projections from the raw lora_A/lora_B weights, bypassing the PEFT LoRA forward {method} runs in; "
            f"set {', '.join(f'{key}: false' for key in KERNEL_KEYS)}"
        )
    for key, why in REFUSED.items():
        if get(key):
            problems.append(f"{key}: {get(key)!r} is not allowed with lora_over_method {method!r}: {why}; remove it")
    replaces = REGISTRY[method].replaces_lora_a
    if replaces and get("lora_model_dir"):
        problems.append(
            f"lora_model_dir: {get('lora_model_dir')!r}: {method} {replaces}, which would "
            "discard the loaded adapter; remove it (resume with resume_from_checkpoint instead)"
        )
    return problems
