"""Merged export: a full-precision model folder with the (collapsed) LoRA update merged into the weights.

The merged model must reproduce the *trained* function. On a bitsandbytes 4-bit base that is the
dequantized 4-bit weight plus the update, not the original unquantized weight plus the update. Merging
in place into a 4-bit layer would re-quantize and lose most of the update, and on CPU an eval forward
repacks the 4-bit weights in a layout PEFT's merge misreads. So (checked by tests/test_export.py): save the
adapter, reload the base with the same quantization, ``dequantize()`` it to float32 ``nn.Linear`` layers,
load the adapter with stock PEFT, ``merge_and_unload()``, and save. One path serves every base.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from lora_over_trl.lora_over.model import banked_factors
from lora_over_trl.utils.atomic import staged_directory

__all__ = ["export_merged"]


def export_merged(
    model: PeftModel,
    output_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    tokenizer: Any = None,
    adapter_name: str = "default",
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    adapter_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a merged model folder that plain ``AutoModelForCausalLM.from_pretrained`` loads.

    Args:
        model: a collapsed ``PeftModel`` (plain LoRA weights) on any base, 4-bit included.
        output_dir: the folder to create; written whole or not at all.
        base_model_name_or_path: where to reload the base from; defaults to the adapter config's
            ``base_model_name_or_path``.
        tokenizer: saved beside the model when given.
        adapter_name: the adapter to merge.
        overwrite: replace an existing non-empty ``output_dir``.
        dtype: the weights' dtype on disk; the merge itself runs in float32 (bfloat16 halves a 7B's folder, at
            bfloat16's rounding of the merged weights).
        adapter_state: the LoRA weights to merge, whole, when the model's own are FSDP2 shards (the SFT command
            gathers them on every process first); default: the model's.

    Returns:
        The output folder.

    Raises:
        ValueError: the model is still over-parameterized, or no base path is known.
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is false.
    """
    if banked_factors(model, adapter_name):
        raise ValueError("export_merged: the model is still over-parameterized; call collapse(model) first")
    base_path = base_model_name_or_path or model.peft_config[adapter_name].base_model_name_or_path
    if not base_path:
        raise ValueError("export_merged: the adapter config records no base model; pass `base_model_name_or_path`")
    base_class = type(model.get_base_model())
    quantization = getattr(model.get_base_model().config, "quantization_config", None)
    with staged_directory(output_dir, overwrite=overwrite) as staging, tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch, selected_adapters=[adapter_name], state_dict=adapter_state)
        adapter_dir = scratch if adapter_name == "default" else os.path.join(scratch, adapter_name)
        base = load_base(base_class, base_path, quantization)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(dtype)
        merged.config.dtype = dtype
        merged.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(output_dir)


def load_base(base_class: type[nn.Module], path: str, quantization: Any) -> nn.Module:
    """The base in float32; a quantized base is reloaded quantized, then dequantized to plain linears."""
    if quantization is None:
        return base_class.from_pretrained(path, dtype=torch.float32)
    if isinstance(quantization, dict):
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig.from_dict(quantization)
    base = base_class.from_pretrained(path, quantization_config=quantization, dtype=torch.float32, device_map="cpu")
    base = base.dequantize()
    return base.to(torch.float32)
