"""Training checkpoints of the over-parameterized state: save, and restore onto a fresh PEFT model.

A checkpoint is what ``PeftModel.save_pretrained`` writes for the patched model, plus two files beside it.
The adapter file holds every LoRA weight under its standard key (a banked factor's current contraction), so
stock PEFT loads a checkpoint as the function being trained. ``lora_over_bank.safetensors`` holds the factor
bank's storage (one tensor per bank part). ``lora_over.json`` records the
:class:`~lora_over_trl.LoraOverConfig`, the bank's size and every factor's layout, which a scheduler may
have changed since ``apply_lora_over``: the layouts fix the storage's order, so :func:`load_lora_over` rebuilds
the same bank and loads the storage into it as saved.

Format 1 (lora-over-trl 0.1: a ``parametrize`` module with its own cores per factor) is still read by
:func:`load_lora_over`, whose cores are copied into a bank; a Trainer cannot resume from it (its optimizer
state has one entry per core), which :func:`check_resumable` says in one line.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from lora_over_trl.lora_over import mpo
from lora_over_trl.lora_over.config import LoraOverConfig
from lora_over_trl.lora_over.model import BANK_ATTR, banked_factors, banks, over_parameterized_factors, set_layouts
from lora_over_trl.utils.distributed import gathered
from lora_over_trl.utils.peft_layers import lora_modules

__all__ = [
    "adopt_layouts",
    "BANK_FILE",
    "LAYOUT_FILE",
    "FSDP_MODEL_FILE",
    "check_resumable",
    "keep_only_parameters",
    "load_lora_over",
    "read_layout_file",
    "save_lora_over",
    "write_bank_file",
    "write_layout_file",
]

LAYOUT_FILE = "lora_over.json"
BANK_FILE = "lora_over_bank.safetensors"
FSDP_MODEL_FILE = "pytorch_model_fsdp.bin"  # accelerate's model file under FSDP with FULL_STATE_DICT
_FORMAT_VERSION = 2
_READABLE = (1, 2)


def _config_of(model: nn.Module) -> LoraOverConfig:
    config = getattr(model, "lora_over_config", None)
    if config is None or not banked_factors(model, config.adapter_name):
        raise ValueError(
            "the model is not over-parameterized (apply_lora_over() never ran, or collapse() did): "
            "save a plain adapter with model.save_pretrained()"
        )
    return config


def write_layout_file(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``lora_over.json`` (config, bank sizes, factor layouts) into ``directory``, atomically."""
    config = _config_of(model)
    model_banks = banks(model, config.adapter_name)
    state: dict[str, Any] = {
        "format_version": _FORMAT_VERSION,
        "config": config.to_dict(),
        "aux_scale": next(iter(model_banks.values())).aux_scale,
        "banks": {part: bank.storage.numel() for part, bank in model_banks.items()},
        "factors": {
            key: {
                "rows": list(f.layout.rows),
                "cols": list(f.layout.cols),
                "bonds": list(f.layout.bonds),
                "central": f.layout.central,
            }
            for key, f in banked_factors(model, config.adapter_name).items()
        },
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as handle:
        json.dump(state, handle, indent=2)
    os.replace(handle.name, directory / LAYOUT_FILE)
    return directory / LAYOUT_FILE


def bank_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bank's storage by part, whole (an FSDP-sharded storage is gathered: call it on every rank)."""
    config = _config_of(model)
    tensors = {}
    for part, bank in banks(model, config.adapter_name).items():
        tensors[part] = gathered(bank.storage.detach()).cpu().contiguous()
    return tensors


def write_bank_file(tensors: dict[str, torch.Tensor], directory: str | os.PathLike) -> Path:
    """Write ``lora_over_bank.safetensors`` (from :func:`bank_tensors`) into ``directory``, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
        pass
    save_file(tensors, handle.name)
    os.replace(handle.name, directory / BANK_FILE)
    return directory / BANK_FILE


def keep_only_parameters(model: nn.Module, path: Path) -> None:
    """Drop the banked factors' weights from accelerate's FSDP model file (``FULL_STATE_DICT``), keeping the rest.

    A banked factor's ``weight`` is no parameter (the bank's storage, saved in the same file, defines it), yet its
    ``state_dict`` entry is there so that the adapter file is a standard one. FSDP2's resume broadcasts the file
    into the model's own parameters and fails on a key it has none for. Under PEFT the file holds the adapter only.

    Args:
        model: the model the file was saved from.
        path: the file (``checkpoint-N/pytorch_model_fsdp.bin``); nothing is done when it is not there.
    """
    if not path.is_file():  # not an FSDP run, or a sharded state dict (a folder)
        return
    saved = torch.load(path, map_location="cpu", weights_only=True)
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    kept = {key: value for key, value in saved.items() if key in names}
    if len(kept) < len(saved):
        staging = path.with_name(f".{path.name}.tmp")
        torch.save(kept, staging)
        staging.replace(path)


def _read(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / LAYOUT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a LoRA-Over checkpoint (plain adapters load with PEFT)")
    state = json.loads(path.read_text())
    if state.get("format_version") not in _READABLE:
        raise ValueError(f"{path}: format_version {state.get('format_version')!r}, this version reads {_READABLE}")
    return state


def read_layout_file(directory: str | os.PathLike) -> tuple[LoraOverConfig, dict[str, mpo.MpoLayout], float]:
    """The config, the layout of every factor, and the auxiliary scale recorded in ``directory/lora_over.json``.

    Raises:
        FileNotFoundError: no ``lora_over.json``.
        ValueError: a format version this code does not read.
    """
    state = _read(directory)
    layouts = {
        key: mpo.MpoLayout(tuple(f["rows"]), tuple(f["cols"]), tuple(f["bonds"]), f["central"])
        for key, f in state["factors"].items()
    }
    scales = {float(f.get("aux_scale", 1.0)) for f in state["factors"].values()} | {float(state.get("aux_scale", 1.0))}
    if state["format_version"] == 1 and len(scales) > 1:
        scales.discard(1.0)  # format 1 recorded the scale per factor; the top-level default is not a value
    return LoraOverConfig.from_dict(state["config"]), layouts, max(scales)


def check_resumable(directory: str | os.PathLike) -> None:
    """Refuse, in one line, a checkpoint a Trainer cannot resume from (format 1: one optimizer entry per core).

    Raises:
        ValueError: the checkpoint was written by lora-over-trl 0.1.
    """
    if _read(directory)["format_version"] == 1:
        raise ValueError(
            f"{directory} was written by lora-over-trl 0.1 (a parametrization per factor), whose optimizer state "
            "has one entry per core: it cannot resume here. Start a new run; load_lora_over() still reads its "
            "weights"
        )


def _reserve(state: dict[str, Any]) -> int | dict[str, int]:
    sizes = state.get("banks", {})
    return next(iter(sizes.values())) if len(sizes) == 1 else dict(sizes)


def restore_layouts(model: nn.Module, directory: str | os.PathLike, optimizer=None) -> LoraOverConfig:
    """Give ``model`` the recorded bank (layouts, sizes, scale), with values yet to be loaded.

    Factors installed now but not recorded become plain; recorded ones are installed or changed. Everything
    is checked before the model is touched.
    """
    state = _read(directory)
    config, recorded, aux_scale = read_layout_file(directory)
    layers = lora_modules(model, config.adapter_name)
    for key, layout in recorded.items():
        name, attr = key.rsplit(".", 1)
        if name not in layers:
            raise ValueError(f"load_lora_over: checkpoint module `{name}` has no LoRA layer in this model")
        linear = getattr(layers[name], attr)[config.adapter_name]
        shape = tuple(linear.weight.shape)
        if shape != layout.shape:
            raise ValueError(
                f"load_lora_over: `{key}` has shape {shape} here but {layout.shape} in the checkpoint: "
                "the adapter's rank or the base model differ from the checkpoint's"
            )
    current = banks(model, config.adapter_name)
    if current and any(b.aux_scale != aux_scale or b.storage.numel() != n for b, n in _pairs(current, state)):
        set_layouts(model, dict.fromkeys(banked_factors(model, config.adapter_name)), config)
    installed = banked_factors(model, config.adapter_name)
    targets = {key: None for key in installed if key not in recorded} | recorded
    set_layouts(model, targets, config, aux_scale=aux_scale, reserve=_reserve(state), optimizer=optimizer)
    bank_file = Path(directory) / BANK_FILE
    if bank_file.is_file():
        _load_storage(model, config, load_file(bank_file))
    model.lora_over_config = config
    return config


def adopt_layouts(model: nn.Module, directory: str | os.PathLike) -> None:
    """Give the model's banks the layouts recorded in ``directory`` for the values they already hold.

    Under FSDP the Trainer resumes through accelerate's loader, which writes a checkpoint's bank storage straight
    into the parameter: the factors the bank holds are the same (a scheduled run banks all of them from the start),
    only their plan is the checkpoint's. Nothing moves.
    """
    _, recorded, _ = read_layout_file(directory)
    for bank in banks(model, _config_of(model).adapter_name).values():
        bank.adopt({key: recorded.get(key, layout) for key, layout in bank.layouts.items()})


@torch.no_grad()
def _load_storage(model: nn.Module, config: LoraOverConfig, saved: dict[str, torch.Tensor]) -> None:
    model_banks = banks(model, config.adapter_name)
    if len(model_banks) == 1 and len(saved) == 1:  # e.g. trained on a GPU in bfloat16, loaded on a CPU
        pairs = [(next(iter(model_banks.values())), next(iter(saved.values())))]
    else:
        missing = sorted(set(model_banks) - set(saved))
        if missing:
            raise ValueError(f"load_lora_over: {BANK_FILE} has no storage for bank part(s) {missing}")
        pairs = [(bank, saved[part]) for part, bank in model_banks.items()]
    for bank, tensor in pairs:
        if tensor.shape != bank.storage.shape:
            raise ValueError(
                f"load_lora_over: {BANK_FILE} holds {tuple(tensor.shape)} elements, the recorded bank "
                f"{tuple(bank.storage.shape)}: the folder's files do not belong together"
            )
        bank.storage.copy_(tensor)


def _pairs(current: dict, state: dict) -> list:
    sizes = state.get("banks", {})
    if len(current) == 1 and len(sizes) == 1:
        return [(next(iter(current.values())), next(iter(sizes.values())))]
    return [(bank, sizes.get(part, -1)) for part, bank in current.items()]


def save_lora_over(model: nn.Module, directory: str | os.PathLike, **save_kwargs: Any) -> None:
    """Save the over-parameterized adapter (``save_pretrained``) and its ``lora_over.json``.

    Raises:
        ValueError: the model is not over-parameterized.
    """
    _config_of(model)
    model.save_pretrained(directory, **save_kwargs)
    write_bank_file(bank_tensors(model), directory)
    write_layout_file(model, directory)


def load_lora_over(model: nn.Module, directory: str | os.PathLike) -> LoraOverConfig:
    """Restore a :func:`save_lora_over` checkpoint onto a fresh ``PeftModel`` with the same LoRA config.

    Installs the recorded bank, then loads every saved tensor (the storage included) exactly.

    Returns:
        The checkpoint's :class:`LoraOverConfig` (also set as ``model.lora_over_config``).

    Raises:
        FileNotFoundError: ``directory`` has no ``lora_over.json``.
        ValueError: the model is already over-parameterized, lacks a recorded module, has other shapes,
            or the saved tensors do not cover the model's adapter.
    """
    state = _read(directory)
    adapter = LoraOverConfig.from_dict(state["config"]).adapter_name
    if banked_factors(model, adapter):
        raise ValueError("load_lora_over: the model is already over-parameterized; load onto a fresh PeftModel")
    config = restore_layouts(model, directory)
    saved = load_peft_weights(str(directory))
    if state["format_version"] == 1:
        _copy_format_1_cores(model, config, saved)
        saved = {k: v for k, v in saved.items() if ".parametrizations." not in k}
    result = set_peft_model_state_dict(model, saved, adapter_name=config.adapter_name)
    missing = [
        k for k in result.missing_keys if f".{config.adapter_name}." in k and "lora_" in k and BANK_ATTR not in k
    ]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"load_lora_over: saved tensors do not match the model: unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing[:3]}"
        )
    return config


@torch.no_grad()
def _copy_format_1_cores(model: nn.Module, config: LoraOverConfig, saved: dict[str, torch.Tensor]) -> None:
    """Format 1 kept factor ``K``'s stored cores as ``base_model.model.K.<adapter>.parametrizations.weight.0.cores.<j>``
    (divided by the auxiliary scale, as the bank stores them)."""
    for key, factor in over_parameterized_factors(model, config.adapter_name).items():
        for j, core in enumerate(factor.cores):
            name = f"base_model.model.{key}.{config.adapter_name}.parametrizations.weight.0.cores.{j}"
            if name not in saved:
                raise ValueError(f"load_lora_over: the format-1 checkpoint has no `{name}`")
            core.copy_(saved[name])
