"""Beyond data parallel: which sharded mode a run is in, and what FSDP2 sharded (:mod:`lora_over_trl.registry`
says which method runs where).

``accelerate launch --config_file`` tells the processes it starts through environment variables
(``ACCELERATE_USE_FSDP`` and ``FSDP_VERSION``; ``ACCELERATE_USE_DEEPSPEED`` and ``ACCELERATE_DEEPSPEED_ZERO_STAGE``);
a script says it with ``TrainingArguments(fsdp=..., fsdp_config=...)`` or ``deepspeed=...``. Both are read here,
before anything is loaded, so a combination that cannot work stops in one line instead of failing (or silently
training something else) after the first steps.

What runs where (docs/distributed.md has the table with the tests):

- FSDP2: plain LoRA, LoRA-Over (every factor is in the bank, the root unit's parameter, before accelerate shards
  the model) and the cLA family. Outside a forward, reads of a sharded LoRA weight gather it (:func:`gathered`)
  and writes put each rank's shard of the whole value (:func:`write_whole`): c3LA's chain step reads the trained
  ``B`` gathered into its frozen part (a plain tensor, the same on every rank) and rewrites the window selector
  in ``lora_A``; the collapse builds plain factors from gathered weights. A chain on PEFT's parameter-wrapping
  layers (``target_parameters``) is refused: its ``lora_A`` grows with every step. GLoRA's supernet edits LoRA
  weights in place outside a forward and its search runs forwards on one process: refused.
- FSDP1 (flat parameters): refused for every method with a callback; they read and rewrite parameters by module.
- DeepSpeed: ZeRO keeps Adam's moments in its own flat partitions and copies its master weights over the
  parameters after each step, so whatever rewrites parameters or moves optimizer state between steps (LoRA-Over's
  re-allocation, c3LA's chain) is refused; ZeRO-3 also empties every parameter outside its module's forward, which
  the bank's contraction, collapse and checkpoints read, so LoRA-Over, cLA and GLoRA are refused there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ShardedMode", "gathered", "launch_mode", "sharding_report", "write_whole"]


@dataclass(frozen=True)
class ShardedMode:
    """A sharded training mode: ``kind`` is ``"fsdp"`` or ``"deepspeed"``; ``level`` the FSDP version or ZeRO stage."""

    kind: str
    level: int

    @property
    def label(self) -> str:
        return f"FSDP{self.level}" if self.kind == "fsdp" else f"DeepSpeed ZeRO-{self.level}"


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (FSDP2's shard of a parameter, a moment or a gradient) is gathered, a collective
    that every rank calls at the same point; any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def write_whole(target: torch.Tensor, whole: torch.Tensor) -> None:
    """``target[:] = whole`` without autograd; for a DTensor (FSDP2's shard of a parameter or a moment), this rank's
    shard of ``whole``.

    ``whole`` is the entire value, the same on every rank (e.g. computed from :func:`gathered` tensors): each rank
    keeps its own part of it, so no collective runs; every rank calls it alike all the same, as FSDP2 expects every
    rank's shard to change together.
    """
    with torch.no_grad():
        # The DTensor branch runs only under FSDP2, in torchrun workers (tests/test_bank.py's FSDP2 test and
        # tests/test_distributed.py) that mutation testing cannot reach: it is left out of it (docs/testing.md).
        # pragma: no mutate start
        if hasattr(target, "to_local"):
            from torch.distributed.tensor import distribute_tensor

            whole = whole.to(device=target.device, dtype=target.dtype)
            local = distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None).to_local()
            target.to_local().copy_(local)
            return
        # pragma: no mutate end
        target.copy_(whole)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launch_mode(training_args: Any = None) -> ShardedMode | None:
    """The sharded mode the launcher (environment) or the training arguments ask for; ``None`` for DDP or one process.

    Args:
        training_args: ``TrainingArguments``/``SFTConfig``, read for ``fsdp``/``fsdp_config`` and ``deepspeed``.

    Returns:
        A :class:`ShardedMode`, or ``None``.
    """
    fsdp = getattr(training_args, "fsdp", None)
    if _env_true("ACCELERATE_USE_FSDP") or fsdp:
        config = getattr(training_args, "fsdp_config", None) or {}
        version = os.environ.get("FSDP_VERSION") or config.get("version") or config.get("fsdp_version") or 1
        return ShardedMode("fsdp", int(version))
    deepspeed = getattr(training_args, "deepspeed", None)
    if _env_true("ACCELERATE_USE_DEEPSPEED") or deepspeed:
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None and deepspeed:
            config = deepspeed if isinstance(deepspeed, dict) else _read_json(deepspeed)
            stage = (config.get("zero_optimization") or {}).get("stage", 0)
        return ShardedMode("deepspeed", int(stage or 0))
    return None


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}  # TrainingArguments reports a bad DeepSpeed config itself


def sharding_report(model: nn.Module) -> dict[str, int]:
    """What FSDP2 sharded, seen from this process: base weights (4-bit ones apart) that are DTensors, and sizes.

    ``*_local_elements`` counts this process's shards, ``*_elements`` the whole tensors: with two processes the
    local count of a sharded weight is about half of the whole. Elements are those of the stored tensor (a 4-bit
    weight stores two values per byte in a ``bnb_4bit_quant_storage`` element of one or more bytes).
    """
    report = dict.fromkeys(
        (
            "base_weights",
            "base_weights_sharded",
            "base_elements",
            "base_local_elements",
            "quantized_weights",
            "quantized_weights_sharded",
            "quantized_elements",
            "quantized_local_elements",
        ),
        0,
    )
    for name, param in model.named_parameters():
        if "lora_" in name or "lora_over_bank" in name:
            continue
        local = param.to_local() if hasattr(param, "to_local") else param
        quantized = type(local).__name__ == "Params4bit" or _is_4bit_module_weight(model, name)
        for prefix in ("base", "quantized") if quantized else ("base",):
            report[f"{prefix}_weights"] += 1
            report[f"{prefix}_weights_sharded"] += int(hasattr(param, "to_local") and local.numel() < param.numel())
            report[f"{prefix}_elements"] += param.numel()
            report[f"{prefix}_local_elements"] += local.numel()
    return report


def _is_4bit_module_weight(model: nn.Module, name: str) -> bool:
    """``name`` is the weight of a bitsandbytes ``Linear4bit`` (FSDP2 may have replaced its ``Params4bit``)."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return attr == "weight" and type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")
