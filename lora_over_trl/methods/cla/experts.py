"""cLA on PEFT's parameter-wrapping LoRA layers (``LoraConfig(target_parameters=[...])``: ``ParamWrapper``).

A ``ParamWrapper`` adapts a parameter (a fused 3-D expert stack ``(experts, ., .)``, or a 2-D weight such as a MoE
router's) and never calls ``lora_A`` / ``lora_B``: each forward it reads their ``.weight`` and adds the delta to the
parameter. Its factors hold every expert at once, in PEFT's layout for ``E`` experts of rank ``r``::

    lora_A.weight  (E r, n)   rows  e r + k   : expert e, rank k     (expert-major)
    lora_B.weight  (m, r E)   column k E + e  : rank k, expert e     (rank-major)

So for cLA on such a layer the *weights* must carry the whole update: ``lora_A`` holds every expert's window
selector (all experts share the module's window) and, while a chain runs, ``lora_B.weight`` is the trained ``B``
followed by the frozen ``B_j``'s (:class:`FrozenRanks`, a parametrization). Because ``lora_B`` is rank-major,
appending whole ranks for every expert is a plain column concatenation, the same one :class:`ChainedB` does; in
``lora_A`` each expert's rows are contiguous, so the selector is written per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "FrozenRanks",
    "ParamWindowSelect",
    "add_frozen_ranks",
    "chain_holder",
    "expert_count",
    "expert_selector",
    "reads_weights",
    "trained_b",
]


def reads_weights(layer: nn.Module) -> bool:
    """Whether PEFT applies the layer's LoRA from the factors' ``.weight`` alone (``ParamWrapper``)."""
    return isinstance(layer, ParamWrapper)


def expert_count(layer: nn.Module) -> int:
    """Experts the layer's factors hold (1 for a linear LoRA layer or a 2-D wrapped parameter)."""
    return getattr(layer, "num_experts", 1) if reads_weights(layer) else 1


def expert_selector(indices: torch.Tensor, n: int, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """``lora_A.weight`` in PEFT's expert-major layout: ``experts`` copies of the ``len(indices) x n`` selector."""
    rows = torch.zeros(len(indices), n, dtype=dtype, device=indices.device)
    rows[torch.arange(len(indices), device=indices.device), indices] = 1
    return rows.repeat(experts, 1)  # expert e's rows: e * R .. (e + 1) * R - 1


class ParamWindowSelect(nn.Linear):
    """``lora_A`` of a ``ParamWrapper`` as column windows: ``weight`` is every expert's selector of the current window
    and the frozen ones (most recent first), ``(experts * R) x n``, frozen.

    Keeps :class:`~lora_over_trl.methods.cla.model.WindowSelect`'s index bookkeeping (``current_indices``,
    ``frozen_indices``, ``all_indices``), so the chain and its checkpoints treat both alike. Unlike it, ``weight``
    holds the frozen windows too: PEFT reads nothing else.
    """

    def __init__(
        self, in_features: int, experts: int, current: torch.Tensor, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__(in_features, experts * len(current), bias=False, dtype=dtype, device=device)
        self.experts = experts
        self.weight.requires_grad_(False)
        self.frozen_indices = torch.zeros(0, dtype=torch.long, device=device)
        self.set_window(current)

    def set_window(self, current: torch.Tensor, frozen: torch.Tensor | None = None) -> None:
        """Make ``current`` the trained window, ``frozen`` (when given) the earlier ones; rewrites ``weight``."""
        device = self.weight.device
        self.current_indices = current.to(device)
        if frozen is not None:
            self.frozen_indices = frozen.to(device)
        self.all_indices = torch.cat([self.current_indices, self.frozen_indices])
        weight = expert_selector(self.all_indices, self.in_features, self.experts, self.weight.dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)  # the rank grows with the chain
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PEFT's ParamWrapper never calls this; kept equal to what its weight means
        return F.linear(x, self.weight)


class FrozenRanks(nn.Module):
    """A parametrization of a ``ParamWrapper``'s ``lora_B.weight``: the trained ``B`` (``m x r E``), then the frozen
    ``B_j``'s (``m x k r E``, a non-persistent buffer: checkpoints keep it in the chain file, not twice)."""

    def __init__(self, frozen: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("frozen", frozen, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.frozen.shape[1]:
            return weight
        return torch.cat([weight, self.frozen.to(weight.dtype)], dim=1)  # whole ranks appended: see the module doc


def add_frozen_ranks(linear_b: nn.Linear) -> None:
    """Give a ``ParamWrapper``'s ``lora_B`` an (empty) frozen part; its ``weight`` parameter stays the one trained."""
    frozen = linear_b.weight.detach().new_zeros(linear_b.out_features, 0)
    # unsafe: the parametrized weight widens with every chain step (the trained parameter keeps its shape)
    parametrize.register_parametrization(linear_b, "weight", FrozenRanks(frozen), unsafe=True)


def trained_b(linear_b: nn.Module) -> nn.Parameter:
    """The parameter that trains in ``lora_B`` (the optimizer's), with or without a frozen part."""
    if parametrize.is_parametrized(linear_b, "weight"):
        return linear_b.parametrizations.weight.original
    return linear_b.weight


def chain_holder(linear_b: nn.Module) -> nn.Module | None:
    """The module whose ``frozen`` attribute holds ``lora_B``'s frozen ``B_j``'s (``None``: no chain)."""
    if parametrize.is_parametrized(linear_b, "weight"):
        return linear_b.parametrizations.weight[0]
    return linear_b if hasattr(linear_b, "frozen") else None
