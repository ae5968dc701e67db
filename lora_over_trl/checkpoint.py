"""Training checkpoints of the over-parameterized state: save, and restore onto a fresh PEFT model.

A checkpoint is what ``PeftModel.save_pretrained`` writes for the patched model (its state dict holds the
cores under ``...lora_A.parametrizations.weight.0.cores.<j>``) plus ``lora_over.json`` beside it: the
:class:`~lora_over_trl.config.LoraOverConfig` and every factor's layout, which a scheduler may have
changed since ``apply_lora_over``. Stock PEFT cannot read such a folder; :func:`load_lora_over` can.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from peft.utils import load_peft_weights, set_peft_model_state_dict
from torch import nn

from . import mpo
from .config import LoraOverConfig
from .patch import (
    FACTOR_OF_ATTR,
    ensure_refresh_hook,
    install_layout,
    lora_modules,
    over_parameterized_factors,
)

__all__ = ["LAYOUT_FILE", "load_lora_over", "read_layout_file", "save_lora_over", "write_layout_file"]

LAYOUT_FILE = "lora_over.json"
_FORMAT_VERSION = 1


def _config_of(model: nn.Module) -> LoraOverConfig:
    config = getattr(model, "lora_over_config", None)
    if config is None or not over_parameterized_factors(model, config.adapter_name):
        raise ValueError(
            "the model is not over-parameterized (apply_lora_over() never ran, or collapse() did): "
            "save a plain adapter with model.save_pretrained()"
        )
    return config


def write_layout_file(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``lora_over.json`` (config and factor layouts) into ``directory``, atomically."""
    config = _config_of(model)
    state: dict[str, Any] = {
        "format_version": _FORMAT_VERSION,
        "config": config.to_dict(),
        "factors": {
            key: {
                "rows": list(f.layout.rows),
                "cols": list(f.layout.cols),
                "bonds": list(f.layout.bonds),
                "central": f.layout.central,
                "aux_scale": f.aux_scale,
            }
            for key, f in over_parameterized_factors(model, config.adapter_name).items()
        },
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as handle:
        json.dump(state, handle, indent=2)
    os.replace(handle.name, directory / LAYOUT_FILE)
    return directory / LAYOUT_FILE


def read_layout_file(directory: str | os.PathLike) -> tuple[LoraOverConfig, dict[str, tuple[mpo.MpoLayout, float]]]:
    """The config and, per factor key, ``(layout, aux_scale)`` recorded in ``directory/lora_over.json``.

    Raises:
        FileNotFoundError: no ``lora_over.json``.
        ValueError: a format version this code does not read.
    """
    path = Path(directory) / LAYOUT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a LoRA-Over checkpoint (plain adapters load with PEFT)")
    state = json.loads(path.read_text())
    if state.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {state.get('format_version')!r}, this version reads {_FORMAT_VERSION}"
        )
    recorded = {
        key: (
            mpo.MpoLayout(tuple(f["rows"]), tuple(f["cols"]), tuple(f["bonds"]), f["central"]),
            float(f.get("aux_scale", 1.0)),
        )
        for key, f in state["factors"].items()
    }
    return LoraOverConfig.from_dict(state["config"]), recorded


def save_lora_over(model: nn.Module, directory: str | os.PathLike, **save_kwargs: Any) -> None:
    """Save the over-parameterized adapter (``save_pretrained``) and its ``lora_over.json``.

    Raises:
        ValueError: the model is not over-parameterized.
    """
    _config_of(model)
    model.save_pretrained(directory, **save_kwargs)
    write_layout_file(model, directory)


def load_lora_over(model: nn.Module, directory: str | os.PathLike) -> LoraOverConfig:
    """Restore a :func:`save_lora_over` checkpoint onto a fresh ``PeftModel`` with the same LoRA config.

    Installs factors with the recorded layouts, then loads every saved tensor (cores included) exactly.

    Returns:
        The checkpoint's :class:`LoraOverConfig` (also set as ``model.lora_over_config``).

    Raises:
        FileNotFoundError: ``directory`` has no ``lora_over.json``.
        ValueError: the model is already over-parameterized, lacks a recorded module, has other shapes,
            or the saved tensors do not cover the model's adapter.
    """
    config, recorded = read_layout_file(directory)
    if over_parameterized_factors(model, config.adapter_name):
        raise ValueError("load_lora_over: the model is already over-parameterized; load onto a fresh PeftModel")
    layers = lora_modules(model, config.adapter_name)
    planned = []
    for key, (layout, aux_scale) in recorded.items():  # check everything before touching the model
        name, attr = key.rsplit(".", 1)
        if name not in layers:
            raise ValueError(f"load_lora_over: checkpoint module `{name}` has no LoRA layer in this model")
        shape = tuple(getattr(layers[name], attr)[config.adapter_name].weight.shape)
        if shape != layout.shape:
            raise ValueError(
                f"load_lora_over: `{key}` has shape {shape} here but {layout.shape} in the checkpoint: "
                "the adapter's rank or the base model differ from the checkpoint's"
            )
        planned.append((layers[name], FACTOR_OF_ATTR[attr], layout, aux_scale))
    for layer, which, layout, aux_scale in planned:
        install_layout(layer, which, config.adapter_name, layout, aux_scale)
    result = set_peft_model_state_dict(model, load_peft_weights(str(directory)), adapter_name=config.adapter_name)
    missing = [k for k in result.missing_keys if f".{config.adapter_name}." in k and "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"load_lora_over: saved tensors do not match the model: unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing[:3]}"
        )
    model.lora_over_config = config
    ensure_refresh_hook(model)
    return config
