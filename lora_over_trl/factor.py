"""One over-parameterized LoRA factor: a ``torch.nn.utils.parametrize`` module whose weight is an MPO.

With this parametrization registered on ``lora_A[name].weight`` (``r x n``) or ``lora_B[name].weight``
(``m x r``), PEFT's LoRA forward is unchanged: it reads ``.weight`` and gets ``contract(cores)``, an
``r x n`` (or ``m x r``) matrix whose cost does not depend on the batch. The cores are the trainable
parameters; the frozen ``original`` tensor that ``parametrize`` keeps is only the weight at install time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from . import mpo

__all__ = ["MpoFactor", "default_std", "refresh_all"]


def default_std(in_features: int) -> float:
    """Scale of the random half of padded bond slots: Kaiming-like, ``1 / sqrt(fan_in)`` of the factor."""
    return 1.0 / math.sqrt(max(in_features, 1))


class MpoFactor(nn.Module):
    """Parametrization ``weight = contract(cores)`` with the cores laid out by an :class:`~mpo.MpoLayout`.

    Args:
        layout: how the factor is split into cores (shape, bonds, central core).
        cores: initial core tensors (see :func:`mpo.decompose`); they become this module's parameters.
        aux_scale: the auxiliary cores are stored divided by this and multiplied back in the contraction.
            Adam's update is invariant to the gradient's scale, so a stored core moves by ``lr`` per step
            and the core itself by ``aux_scale * lr``: the auxiliary learning rate is ``aux_scale`` times the
            main one, in any Trainer, with no extra optimizer group (exact for Adam-family optimizers up to
            their epsilon; weight decay still acts on the stored values).

    Example:
        >>> import torch
        >>> from torch.nn.utils import parametrize
        >>> lin = torch.nn.Linear(64, 8, bias=False)
        >>> factor = MpoFactor.from_weight(lin.weight.detach(), capacity=1.0)
        >>> _ = parametrize.register_parametrization(lin, "weight", factor)
    """

    def __init__(self, layout: mpo.MpoLayout, cores: list[torch.Tensor], aux_scale: float = 1.0) -> None:
        super().__init__()
        shapes = [tuple(t.shape) for t in cores]
        if shapes != layout.core_shapes():
            raise ValueError(f"MpoFactor: core shapes {shapes} do not match the layout's {layout.core_shapes()}")
        if not aux_scale > 0:
            raise ValueError(f"MpoFactor: `aux_scale` must be > 0, got {aux_scale!r}")
        self.layout = layout
        self.aux_scale = float(aux_scale)
        self.cores = nn.ParameterList([nn.Parameter(t) for t in self._stored(cores)])
        self._cached: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        # Called as grad_observer(W, dL/dW) when backward reaches the contracted weight (a scheduler's statistic).
        self.grad_observer: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        capacity: float,
        *,
        num_cores: int = 2,
        aux_core_size: int = 16,
        std: float | None = None,
        generator: torch.Generator | None = None,
        aux_scale: float = 1.0,
    ) -> MpoFactor | None:
        """Over-parameterize ``weight`` with at most ``capacity * weight.numel()`` auxiliary parameters.

        Returns ``None`` when the capacity cannot hold even the exact layout (the factor stays plain).
        """
        layout = cls.plan(tuple(weight.shape), capacity, num_cores=num_cores, aux_core_size=aux_core_size)
        if layout is None:
            return None
        std = default_std(weight.shape[1]) if std is None else std
        return cls(layout, mpo.decompose(weight.detach(), layout, std=std, generator=generator), aux_scale)

    @staticmethod
    @functools.lru_cache(maxsize=4096)  # a pure function of small arguments, asked again at every re-allocation
    def plan(
        shape: tuple[int, int], capacity: float, *, num_cores: int = 2, aux_core_size: int = 16
    ) -> mpo.MpoLayout | None:
        """The layout :meth:`from_weight` would choose for a factor of ``shape`` (``None``: stays plain)."""
        base = mpo.choose_layout(*shape, num_cores=num_cores, aux_size=aux_core_size)
        return mpo.fit_bonds(base, math.floor(capacity * shape[0] * shape[1]))

    @classmethod
    def empty(
        cls, layout: mpo.MpoLayout, *, dtype: torch.dtype, device: torch.device | str, aux_scale: float = 1.0
    ) -> MpoFactor:
        """Zero cores in ``layout``, to be filled by ``load_state_dict`` (restoring a checkpoint)."""
        return cls(layout, [torch.zeros(s, dtype=dtype, device=device) for s in layout.core_shapes()], aux_scale)

    def _stored(self, cores: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.aux_scale == 1.0:
            return list(cores)
        return [t if j == self.layout.central else t / self.aux_scale for j, t in enumerate(cores)]

    def effective_cores(self) -> list[torch.Tensor]:
        """The cores whose contraction is the factor (the stored ones with ``aux_scale`` applied)."""
        if self.aux_scale == 1.0:
            return list(self.cores)
        return [t if j == self.layout.central else t * self.aux_scale for j, t in enumerate(self.cores)]

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        # `original` is the weight at install time: the cores alone define the factor.
        if self._cached is not None and self._cache_key == self._state_key():
            return self._cached
        return mpo.contract(self.effective_cores())

    def refresh(self, weight: torch.Tensor | None = None) -> None:
        """Contract now (or take ``weight``, this factor's slice of a batched contraction) and serve
        the result to every read of ``.weight`` until it is spent.

        PEFT reads ``.weight`` twice per forward (its dtype, then the matmul) and gradient checkpointing
        reads it again in backward. Called before the model's forward (outside any checkpointed region,
        so recomputation saves the same tensors), this makes it one contraction per factor and step. The
        result is dropped when backward reaches it (its graph is spent) and ignored once the cores change.
        """
        if weight is None:
            weight = mpo.contract(self.effective_cores())
        if weight.requires_grad:
            weight.register_hook(self._forget)
            if self.grad_observer is not None:
                weight.register_hook(functools.partial(self.grad_observer, weight.detach()))
        self._cached, self._cache_key = weight, self._state_key()

    def _state_key(self) -> tuple:
        return (
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            tuple((c._version, c.data_ptr(), c.dtype, c.device) for c in self.cores),
        )

    def _forget(self, grad: torch.Tensor) -> None:
        self._cached = None

    def __getstate__(self) -> dict:
        # A cached non-leaf tensor can be neither deep-copied nor pickled; it is only a cache.
        return {**self.__dict__, "_cached": None, "_cache_key": None, "grad_observer": None}

    @property
    def aux_params(self) -> int:
        """Parameters beyond those of the plain factor."""
        return self.layout.aux_params()

    def auxiliary_cores(self) -> list[nn.Parameter]:
        """All cores but the central one (the ones OPF gives their own learning rate)."""
        return [t for j, t in enumerate(self.cores) if j != self.layout.central]

    @torch.no_grad()
    def resize(self, bonds: tuple[int, ...], *, std: float, generator: torch.Generator | None = None) -> float:
        """Change the bond dimensions in place, keeping the contraction; returns the relative error.

        Only growing bonds pads them (exact, error 0.0); any smaller bond re-decomposes by TT-rounding
        (an SVD per bond), whose error is measured and returned. The cores are new ``Parameter`` objects
        afterwards: an optimizer holding the old ones must be told.
        """
        layout = mpo.MpoLayout(self.layout.rows, self.layout.cols, tuple(bonds), self.layout.central)
        old = [t.detach() for t in self.effective_cores()]
        if all(b >= a for a, b in zip(self.layout.bonds, bonds, strict=True)):
            new, error = mpo.grow(old, layout, std=std, generator=generator), 0.0
        else:
            new, error = mpo.truncate(old, layout, std=std, generator=generator)
        requires_grad = self.cores[0].requires_grad
        self.layout = layout
        self.cores = nn.ParameterList([nn.Parameter(t, requires_grad=requires_grad) for t in self._stored(new)])
        self._cached = None
        return error

    def extra_repr(self) -> str:
        scale = f", aux_scale={self.aux_scale:g}" if self.aux_scale != 1.0 else ""
        return (
            f"rows={self.layout.rows}, cols={self.layout.cols}, bonds={self.layout.bonds}, aux={self.aux_params}{scale}"
        )


def refresh_all(factors: list[MpoFactor]) -> None:
    """Refresh many factors, contracting those that share a layout, dtype and device in one batch.

    A model has hundreds of small factors in a handful of layouts; per-factor contraction would be
    dominated by per-operation overhead. ``torch.stack`` copies the cores once per forward (their size,
    a fraction of the LoRA parameters' memory) and turns hundreds of small matmuls into a few batched ones.
    """
    groups: dict[tuple, list[MpoFactor]] = {}
    for factor in factors:
        first = factor.cores[0]
        groups.setdefault((factor.layout, factor.aux_scale, first.dtype, first.device), []).append(factor)
    for group in groups.values():
        if len(group) == 1:
            group[0].refresh()
            continue
        cores = [f.effective_cores() for f in group]
        stacked = [torch.stack([c[j] for c in cores]) for j in range(group[0].layout.num_cores)]
        for factor, weight in zip(group, mpo.contract(stacked).unbind(0), strict=True):
            factor.refresh(weight)
