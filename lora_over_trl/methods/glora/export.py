"""GLoRA's re-parameterization: a merged model folder, and a PEFT LoRA adapter where the choice allows one.

Merged: ``W = W0 + W0 (.) A + B`` and ``b = b0 + b0 (.) D + E + W0 C`` per layer, in float64, written float32.
A layer without a bias that gains one needs the architecture's config switch for it (Llama's
``attention_bias`` / ``mlp_bias``); the switches are found by building the model on the meta device, and every
layer a switch covers gets a bias (zeros where the merge adds none), so stock ``from_pretrained`` loads it.

LoRA: when no layer uses A, C, D or E, the update is ``B`` alone: ``lora_R`` is rank-R LoRA, ``vector`` and
``scalar`` (``B = b 1^T``) are rank 1 with ``A = 1^T``; scaling 1 via ``lora_alpha = r`` per layer.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from lora_over_trl.methods.glora.model import Choice, glora_modules
from lora_over_trl.utils.atomic import staged_directory
from lora_over_trl.utils.export import load_base

__all__ = ["bias_switches", "export_glora", "export_glora_lora", "lora_expressible", "save_glora_outputs"]


def _chosen(model: nn.Module, adapter_name: str) -> dict[str, tuple[nn.Module, Choice]]:
    layers = glora_modules(model, adapter_name)
    if not layers:
        raise ValueError("GLoRA export: the model has no GLoRA layers")
    chosen = {}
    for name, layer in layers.items():
        supernet = layer.lora_A[adapter_name]
        if supernet.choice is None:
            raise ValueError(f"GLoRA export: layer {name} has no choice; run search_glora() or fix_choices() first")
        chosen[name] = (supernet, supernet.choice)
    return chosen


def export_glora(
    model: Any,
    output_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    tokenizer: Any = None,
    adapter_name: str = "default",
    overwrite: bool = False,
) -> Path:
    """Write a float32 model folder with every GLoRA layer merged; stock ``AutoModelForCausalLM`` loads it.

    The base is reloaded in float32 (a 4-bit base reloaded quantized and dequantized: the weights the adapter
    was trained on). Nothing is written when a needed bias cannot be expressed in the architecture's config.

    Raises:
        ValueError: no GLoRA layers, a layer without a choice, no base path, or a bias the config cannot hold.
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is false.
    """
    chosen = _chosen(model, adapter_name)
    base_path = base_model_name_or_path or model.peft_config[adapter_name].base_model_name_or_path
    if not base_path:
        raise ValueError("export_glora: the adapter config records no base model; pass `base_model_name_or_path`")
    quantization = getattr(model.get_base_model().config, "quantization_config", None)
    base = load_base(type(model.get_base_model()), base_path, quantization)
    new_biases = {}
    with torch.no_grad():
        for name, (supernet, choice) in chosen.items():
            linear = base.get_submodule(name)
            w0 = linear.weight.T if supernet.fan_in_fan_out else linear.weight  # (out, in); a view of Conv1D's
            weight_update, bias_update = supernet.merged_update(w0, linear.bias, choice)
            w0.copy_(w0.double() + weight_update)
            if bias_update is not None and linear.bias is not None:
                linear.bias.copy_(linear.bias.double() + bias_update)
            elif bias_update is not None:
                new_biases[name] = bias_update.float()
    _add_biases(base, new_biases)
    with staged_directory(output_dir, overwrite=overwrite) as staging:
        base.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(output_dir)


def bias_switches(model: nn.Module) -> dict[str, set[str]]:
    """Boolean ``config`` keys naming a bias that are off, each with the linear layers it would give a bias."""
    config = model.config
    existing = _biased_linears(model)
    switches = {}
    for key, value in config.to_dict().items():
        if "bias" not in key or value is not False:
            continue
        trial = copy.deepcopy(config)
        setattr(trial, key, True)
        try:
            with torch.device("meta"):
                skeleton = type(model)(trial)
        except Exception:  # a switch this architecture cannot honor on its own
            continue
        gained = _biased_linears(skeleton) - existing
        if gained:
            switches[key] = gained
    return switches


def _biased_linears(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}


def _add_biases(base: nn.Module, new_biases: dict[str, torch.Tensor]) -> None:
    """Turn on the config switches that cover ``new_biases`` and give every layer they cover a bias."""
    if not new_biases:
        return
    switches = bias_switches(base)
    chosen, covered = [], set()
    for name in sorted(new_biases):
        if name in covered:
            continue
        key = next((k for k, layers in switches.items() if name in layers), None)
        if key is None:
            raise ValueError(
                f"GLoRA export: {type(base).__name__} has no config switch that gives {name} a bias; "
                "search again with glora.new_biases: false"
            )
        chosen.append(key)
        covered |= switches[key]
    for key in chosen:
        setattr(base.config, key, True)
    for name in sorted(covered):
        linear = base.get_submodule(name)
        bias = new_biases.get(name, torch.zeros(linear.out_features))
        linear.bias = nn.Parameter(bias.to(linear.weight.dtype), requires_grad=False)


def lora_expressible(model: nn.Module, adapter_name: str = "default") -> str | None:
    """``None`` when the chosen configuration is plain LoRA, else why not (for a message)."""
    for name, (supernet, choice) in _chosen(model, adapter_name).items():
        uses = [t for t in ("A", "C", "E") if getattr(choice, t) != "none"]
        if choice.D != "none" and supernet.has_bias:
            uses.append("D")
        if uses:
            return f"layer {name} uses {', '.join(uses)}"
    return None


def export_glora_lora(
    model: Any,
    output_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    adapter_name: str = "default",
    overwrite: bool = False,
) -> Path | None:
    """Write a standard PEFT LoRA adapter equal to the chosen GLoRA configuration, or return ``None`` when the
    configuration is not LoRA (see :func:`lora_expressible`) or changes no layer."""
    if lora_expressible(model, adapter_name) is not None:
        return None
    tensors, ranks = {}, {}
    for name, (supernet, choice) in _chosen(model, adapter_name).items():
        if choice.B == "none":
            continue
        down, up = supernet.b_down.detach().float(), supernet.b_up.detach().float()
        if choice.B.startswith("lora"):
            k = int(choice.B.split("_")[1])
            lora_a, lora_b = up[:k], down[:, :k]
        else:  # B = b 1^T, with b a column (vector) or a constant (scalar)
            lora_a = torch.ones(1, supernet.in_features)
            lora_b = down[:, :1] if choice.B == "vector" else down[0, 0].expand(supernet.out_features, 1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous()
        ranks[name] = lora_a.shape[0]
    if not ranks:
        return None
    trained = model.peft_config[adapter_name]
    top = max(ranks.values())
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        rank_pattern={name: r for name, r in ranks.items() if r != top},
        alpha_pattern={name: r for name, r in ranks.items() if r != top},
        target_modules=sorted(ranks),
        fan_in_fan_out=trained.fan_in_fan_out,  # GPT-2's Conv1D
        task_type=trained.task_type,
        base_model_name_or_path=trained.base_model_name_or_path,
        revision=trained.revision,
    )
    with staged_directory(output_dir, overwrite=overwrite) as staging:
        config.save_pretrained(staging)
        save_file(tensors, Path(staging) / "adapter_model.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(output_dir)


def save_glora_outputs(trainer: Any, tokenizer: Any, output_dir: Path) -> None:
    """The SFT command's folders for a GLoRA run: ``merged/`` (the re-parameterized model) always, ``adapter/``
    only where the chosen configuration is plain LoRA (:func:`export_glora_lora` leaves it out otherwise)."""
    export_glora(trainer.model, output_dir / "merged", tokenizer=tokenizer, overwrite=True)
    export_glora_lora(trainer.model, output_dir / "adapter", tokenizer=tokenizer, overwrite=True)
