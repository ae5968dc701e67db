"""cLA, random cLA, c3LA, random c3LA on PEFT LoRA layers (Beyond LoRA, arXiv 2606.13767).

::

    h = W0 x + s * B A x          A = [0 .. I_r .. 0]: a window of r input columns, fixed
                                  A x = x[..., window]  (a gather, not a matmul)

    c3LA: h = W0 x + s * (B_t x[..., w_t] + sum_{j<t} B_j x[..., w_j])     B_j frozen, B_t trains from zero

Both factors stay PEFT's own ``lora_A`` / ``lora_B`` slots, so PEFT's forward (dropout, scaling, 4-bit
layers) is untouched: ``lora_A`` becomes :class:`WindowSelect` (its ``weight`` is the dense selector, frozen,
so checkpoints keep PEFT's keys) and, while a chain runs, ``lora_B`` becomes :class:`ChainedB`, which adds the
frozen part. :func:`collapse_cla` writes plain ``nn.Linear`` factors of rank ``windows x r`` back. PEFT's
parameter-wrapping layers (``target_parameters``: MoE experts, routers) read only the factors' weights and lay
out every expert in them: :mod:`lora_over_trl.methods.cla.experts`.

Under FSDP2 (installed before accelerate shards the model) ``B`` and the selector are DTensor shards in their
decoder layer's unit, while the window indices and the frozen part are plain tensors, the same on every rank:
outside a forward the chain and the collapse read the weights gathered and write the selector and ``B`` as each
rank's shard of the whole value (:func:`~lora_over_trl.utils.distributed.gathered`,
:func:`~lora_over_trl.utils.distributed.write_whole`), every rank alike.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_over_trl.methods.cla.config import ClaConfig
from lora_over_trl.methods.cla.experts import (
    ParamWindowSelect,
    add_frozen_ranks,
    chain_holder,
    expert_count,
    reads_weights,
    trained_b,
)
from lora_over_trl.utils.distributed import gathered, write_whole
from lora_over_trl.utils.peft_layers import lora_modules

__all__ = [
    "ChainedB",
    "WindowSelect",
    "collapse_cla",
    "install_cla",
    "next_window",
    "restore_chain",
    "selector",
    "window_indices",
    "window_offsets",
]


def window_offsets(n: int, r: int, config: ClaConfig, name: str) -> list[int]:
    """The window offsets a module visits, in order (one for cla/rcla; every window for c3la/rc3la)."""
    rng = random.Random(config.seed * 1_000_003 + zlib.crc32(name.encode()))
    if config.method == "cla":
        return [0]
    if config.method == "rcla":
        return [rng.randrange(n)]
    starts = list(range(0, n, r))
    if config.method == "rc3la":
        rng.shuffle(starts)
    return starts


def window_indices(offset: int, r: int, n: int) -> torch.Tensor:
    """Columns ``offset .. offset + r - 1``, wrapping past ``n``."""
    return (torch.arange(r) + offset) % n


class WindowSelect(nn.Linear):
    """``lora_A`` as a column window: ``forward(x) = x[..., current + frozen windows]``, a gather.

    ``weight`` is the current window's selector (``r x n``, 0/1, frozen): checkpoints keep PEFT's keys and
    shapes. The frozen windows of a chain (most recent first) follow the current one in the output; their
    ``B`` columns sit in :class:`ChainedB` in the same order.
    """

    def __init__(self, in_features: int, current: torch.Tensor, *, dtype: torch.dtype, device: torch.device):
        super().__init__(in_features, len(current), bias=False, dtype=dtype, device=device)
        self.weight.requires_grad_(False)
        self.frozen_indices = torch.zeros(0, dtype=torch.long, device=device)
        self.set_window(current)

    def set_window(self, current: torch.Tensor, frozen: torch.Tensor | None = None) -> None:
        device = self.weight.device
        self.current_indices = current.to(device)
        if frozen is not None:
            self.frozen_indices = frozen.to(device)
        write_whole(self.weight, selector(self.current_indices, self.in_features, self.weight.dtype))  # FSDP2: a shard
        self.all_indices = torch.cat([self.current_indices, self.frozen_indices])
        steps = self.all_indices[1:] - self.all_indices[:-1]
        contiguous = len(self.all_indices) == 1 or bool((steps == 1).all())
        start = int(self.all_indices[0])
        self._slice = slice(start, start + len(self.all_indices)) if contiguous else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a view when the windows do not wrap: no copy of the activations at all
        return x[..., self._slice] if self._slice is not None else x.index_select(-1, self.all_indices)


def selector(indices: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``len(indices) x n`` 0/1 matrix ``A`` with ``A x = x[indices]``."""
    weight = torch.zeros(len(indices), n, dtype=dtype, device=indices.device)
    weight[torch.arange(len(indices), device=indices.device), indices] = 1
    return weight


class ChainedB(nn.Linear):
    """``lora_B`` with a frozen part: ``forward(h) = h[..., :r] B^T + h[..., r:] frozen^T``.

    ``weight`` (``m x r``) is the trained ``B_t``; ``frozen`` (``m x k r``, not a parameter) holds the
    earlier ``B_j`` in the order of :class:`WindowSelect`'s frozen windows.
    """

    def __init__(self, weight: nn.Parameter, frozen: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = weight
        self.frozen = frozen

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.weight.shape[1]
        out = F.linear(h[..., :r], self.weight)
        if self.frozen.shape[1]:
            out = out + F.linear(h[..., r:], self.frozen.to(h.dtype))
        return out


def install_cla(model: nn.Module, config: ClaConfig) -> dict[str, list[int]]:
    """Turn every LoRA layer's ``A`` into its first window (frozen) and zero ``B``; returns each module's offsets.

    Call before the optimizer is built: the selector is not trainable, so it never reaches the optimizer. On a
    ``ParamWrapper`` every expert gets the module's window (its rank ``r`` is the factors' rows per expert).
    """
    offsets = {}
    for name, layer in lora_modules(model, config.adapter_name).items():
        linear_a, linear_b = layer.lora_A[config.adapter_name], layer.lora_B[config.adapter_name]
        experts = expert_count(layer)
        n, r = linear_a.in_features, linear_a.out_features // experts
        offsets[name] = window_offsets(n, r, config, name)
        # B's dtype: PEFT casts x to lora_A's dtype, and TRL may have cast the trainable B to bfloat16
        kind = dict(dtype=linear_b.weight.dtype, device=linear_b.weight.device)
        current = window_indices(offsets[name][0], r, n)
        wrapped = reads_weights(layer)
        select = ParamWindowSelect(n, experts, current, **kind) if wrapped else WindowSelect(n, current, **kind)
        layer.lora_A[config.adapter_name] = select
        with torch.no_grad():
            linear_b.weight.zero_()  # cLA starts from B = 0 (a no-op adapter)
        if config.chained and wrapped:
            add_frozen_ranks(linear_b)  # PEFT reads B's weight only: the frozen part must be in it
        elif config.chained:
            frozen = linear_b.weight.new_zeros(linear_b.out_features, 0)
            layer.lora_B[config.adapter_name] = ChainedB(linear_b.weight, frozen)
    return offsets


def next_window(layer: nn.Module, adapter_name: str, offset: int) -> None:
    """One chain step: the current ``B`` joins the frozen part, the window moves to ``offset``, ``B`` is zeroed.

    ``B`` stays the same ``Parameter`` (the optimizer keeps it; reset its state separately): only its values
    restart at zero. Under FSDP2 (``B`` a DTensor shard) every rank calls it alike: ``B`` is gathered into the frozen
    part, the same on every rank.
    """
    select, linear_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    holder, weight = chain_holder(linear_b), trained_b(linear_b)
    with torch.no_grad():
        holder.frozen = torch.cat([gathered(weight.detach()).clone(), holder.frozen], dim=1)
        weight.zero_()  # a DTensor zeroes its own shard
    frozen = torch.cat([select.current_indices, select.frozen_indices])
    select.set_window(window_indices(offset, len(select.current_indices), select.in_features), frozen)


def collapse_cla(model: nn.Module, adapter_name: str = "default") -> int:
    """Write every cLA module back as plain LoRA factors (rank ``windows x r``); returns the adapter's ``r``.

    ``lora_A`` becomes the dense selector of every window visited and ``lora_B`` the concatenated ``B``s,
    so ``B A`` is exactly ``sum_j B_j A_j`` (per expert on a ``ParamWrapper``, in PEFT's layout). Every rank of
    the adapter config (``r`` and ``rank_pattern``, which PEFT fills for fused MoE experts) is multiplied by the
    number of windows, and every ``lora_alpha`` (``alpha_pattern`` too) so that PEFT's scaling (``alpha / r``, or
    ``alpha / sqrt(r)`` with rsLoRA) is unchanged.

    Raises:
        ValueError: modules that visited different numbers of windows (one adapter config cannot describe them).
    """
    windows = set()
    layers = lora_modules(model, adapter_name)
    for layer in layers.values():
        select, linear_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if not isinstance(select, WindowSelect | ParamWindowSelect):
            continue
        # the trained B (gathered: under FSDP2 a shard), then the frozen ones, as ChainedB and FrozenRanks append them
        weight_b = gathered(trained_b(linear_b).detach())
        holder = chain_holder(linear_b)
        if holder is not None and holder.frozen.shape[1]:
            weight_b = torch.cat([weight_b, holder.frozen.to(weight_b.dtype)], dim=1)
        if isinstance(select, ParamWindowSelect):  # already every window of every expert
            weight_a = gathered(select.weight.detach()).to(weight_b.dtype)
        else:
            weight_a = selector(select.all_indices, select.in_features, weight_b.dtype)
        kind = dict(bias=False, dtype=weight_b.dtype, device=weight_b.device)
        plain_a = nn.Linear(select.in_features, weight_a.shape[0], **kind)
        plain_b = nn.Linear(weight_b.shape[1], weight_b.shape[0], **kind)
        with torch.no_grad():
            plain_a.weight.copy_(weight_a)
            plain_b.weight.copy_(weight_b)
        plain_b.weight.requires_grad_(trained_b(linear_b).requires_grad)
        layer.lora_A[adapter_name], layer.lora_B[adapter_name] = plain_a, plain_b
        windows.add(len(select.all_indices) // len(select.current_indices))
    if len(windows) > 1:
        raise ValueError(f"collapse_cla: modules visited different numbers of windows {sorted(windows)}")
    if windows and windows != {1}:
        _scale_ranks(model.peft_config[adapter_name], layers.values(), adapter_name, windows.pop())
    return model.peft_config[adapter_name].r


def _scale_ranks(peft_config: Any, layers: Iterable[nn.Module], adapter_name: str, windows: int) -> None:
    """Every rank times ``windows`` and every alpha so that ``alpha / r`` (``alpha / sqrt(r)``) stays: the config's
    ``r``, ``lora_alpha``, ``rank_pattern`` and ``alpha_pattern``, and each layer's ``r`` and ``lora_alpha``."""
    alpha_factor = windows**0.5 if peft_config.use_rslora else windows
    peft_config.r *= windows
    peft_config.lora_alpha *= alpha_factor
    peft_config.rank_pattern = {key: rank * windows for key, rank in (peft_config.rank_pattern or {}).items()}
    peft_config.alpha_pattern = {key: alpha * alpha_factor for key, alpha in (peft_config.alpha_pattern or {}).items()}
    for layer in layers:
        layer.r[adapter_name] *= windows
        layer.lora_alpha[adapter_name] *= alpha_factor


def restore_chain(
    layer: nn.Module, adapter_name: str, offsets: list[int], position: int, frozen_b: torch.Tensor
) -> None:
    """Put a module at chain ``position`` (windows ``offsets[position]`` current, earlier ones frozen)."""
    select, linear_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    r, n = len(select.current_indices), select.in_features
    visited = [offsets[p % len(offsets)] for p in range(position - 1, -1, -1)]  # most recent first
    frozen = torch.cat([window_indices(o, r, n) for o in visited]) if visited else torch.zeros(0, dtype=torch.long)
    select.set_window(window_indices(offsets[position % len(offsets)], r, n), frozen)
    weight = trained_b(linear_b)
    chain_holder(linear_b).frozen = frozen_b.to(device=weight.device, dtype=weight.dtype)
