"""cLA, random cLA, c3LA, random c3LA on PEFT LoRA layers (Beyond LoRA, arXiv 2606.13767).

::

    h = W0 x + s * B A x          A = [0 .. I_r .. 0]: a window of r input columns, fixed
                                  A x = x[..., window]  (a gather, not a matmul)

    c3LA: h = W0 x + s * (B_t x[..., w_t] + sum_{j<t} B_j x[..., w_j])     B_j frozen, B_t trains from zero

Both factors stay PEFT's own ``lora_A`` / ``lora_B`` slots, so PEFT's forward (dropout, scaling, 4-bit
layers) is untouched: ``lora_A`` becomes :class:`WindowSelect` (its ``weight`` is the dense selector, frozen,
so checkpoints keep PEFT's keys) and, while a chain runs, ``lora_B`` becomes :class:`ChainedB`, which adds the
frozen part. :func:`collapse_cla` writes plain ``nn.Linear`` factors of rank ``windows x r`` back.
"""

from __future__ import annotations

import random
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from lora_over_trl.methods.cla.config import ClaConfig
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
        with torch.no_grad():
            self.weight.copy_(selector(self.current_indices, self.in_features, self.weight.dtype))
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

    Call before the optimizer is built: the selector is not trainable, so it never reaches the optimizer.
    """
    offsets = {}
    for name, layer in lora_modules(model, config.adapter_name).items():
        linear_a, linear_b = layer.lora_A[config.adapter_name], layer.lora_B[config.adapter_name]
        n, r = linear_a.in_features, linear_a.out_features
        offsets[name] = window_offsets(n, r, config, name)
        # B's dtype: PEFT casts x to lora_A's dtype, and TRL may have cast the trainable B to bfloat16
        layer.lora_A[config.adapter_name] = WindowSelect(
            n, window_indices(offsets[name][0], r, n), dtype=linear_b.weight.dtype, device=linear_b.weight.device
        )
        with torch.no_grad():
            linear_b.weight.zero_()  # cLA starts from B = 0 (a no-op adapter)
        if config.chained:
            frozen = linear_b.weight.new_zeros(linear_b.out_features, 0)
            layer.lora_B[config.adapter_name] = ChainedB(linear_b.weight, frozen)
    return offsets


def next_window(layer: nn.Module, adapter_name: str, offset: int) -> None:
    """One chain step: the current ``B`` joins the frozen part, the window moves to ``offset``, ``B`` is zeroed.

    ``B`` stays the same ``Parameter`` (the optimizer keeps it; reset its state separately): only its values
    restart at zero.
    """
    select, chained = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    with torch.no_grad():
        chained.frozen = torch.cat([chained.weight.detach().clone(), chained.frozen], dim=1)
        chained.weight.zero_()
    frozen = torch.cat([select.current_indices, select.frozen_indices])
    select.set_window(window_indices(offset, len(select.current_indices), select.in_features), frozen)


def collapse_cla(model: nn.Module, adapter_name: str = "default") -> int:
    """Write every cLA module back as plain LoRA factors (rank ``windows x r``); returns that rank.

    ``lora_A`` becomes the dense selector of every window visited and ``lora_B`` the concatenated ``B``s,
    so ``B A`` is exactly ``sum_j B_j A_j``. PEFT's ``r`` and ``lora_alpha`` are updated so that its scaling
    (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) is unchanged.
    """
    rank = None
    peft_config = model.peft_config[adapter_name]
    for layer in lora_modules(model, adapter_name).values():
        select, linear_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if not isinstance(select, WindowSelect):
            continue
        weight_b = linear_b.weight.detach()
        if isinstance(linear_b, ChainedB):
            weight_b = torch.cat([weight_b, linear_b.frozen.to(weight_b.dtype)], dim=1)
        rank = len(select.all_indices)
        plain_a = nn.Linear(select.in_features, rank, bias=False, dtype=weight_b.dtype, device=weight_b.device)
        plain_b = nn.Linear(rank, weight_b.shape[0], bias=False, dtype=weight_b.dtype, device=weight_b.device)
        with torch.no_grad():
            plain_a.weight.copy_(selector(select.all_indices, select.in_features, weight_b.dtype))
            plain_b.weight.copy_(weight_b)
        plain_b.weight.requires_grad_(linear_b.weight.requires_grad)
        layer.lora_A[adapter_name], layer.lora_B[adapter_name] = plain_a, plain_b
        layer.r[adapter_name] = rank
    if rank is not None and rank != peft_config.r:
        scaling = peft_config.lora_alpha / (peft_config.r**0.5 if peft_config.use_rslora else peft_config.r)
        peft_config.lora_alpha = scaling * (rank**0.5 if peft_config.use_rslora else rank)
        peft_config.r = rank
        for layer in lora_modules(model, adapter_name).values():
            layer.lora_alpha[adapter_name] = peft_config.lora_alpha
    return rank or peft_config.r


def restore_chain(
    layer: nn.Module, adapter_name: str, offsets: list[int], position: int, frozen_b: torch.Tensor
) -> None:
    """Put a module at chain ``position`` (windows ``offsets[position]`` current, earlier ones frozen)."""
    select, chained = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    r, n = len(select.current_indices), select.in_features
    visited = [offsets[p % len(offsets)] for p in range(position - 1, -1, -1)]  # most recent first
    frozen = torch.cat([window_indices(o, r, n) for o in visited]) if visited else torch.zeros(0, dtype=torch.long)
    select.set_window(window_indices(offsets[position % len(offsets)], r, n), frozen)
    chained.frozen = frozen_b.to(device=chained.weight.device, dtype=chained.weight.dtype)
