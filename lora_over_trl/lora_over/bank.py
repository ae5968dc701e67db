"""The factor bank: every over-parameterized LoRA factor of a model in one flat parameter (per dtype and device).

Storage, one 1-D ``nn.Parameter``::

    [ group 0: core 0 of its n_0 factors | core 1 of them | ... ][ group 1: ... ] ... [ reserved, unused ]

A *group* holds the factors that share an :class:`~lora_over_trl.lora_over.mpo.MpoLayout`. Core position ``j`` of a
group is a contiguous ``(n, d_{j-1}, p_j, q_j, d_j)`` view of the storage, so one batched
:func:`~lora_over_trl.lora_over.mpo.contract` per group and forward produces all of its factors, ``(n, p, q)``, and
each LoRA weight (``lora_A[name].weight``, ``lora_B[name].weight``) is a slice of that result. PEFT's forward is
untouched: it reads ``.weight`` and gets the slice. The optimizer sees one tensor instead of hundreds, and a
step costs a few operations per group, not per factor.

Why one flat tensor, not a tensor per group: the dynamic schedule moves factors between groups (a module
enters, leaves, changes level). In a flat storage that is a permutation of the tensor's contents, and of its
optimizer moments, in place: the parameter object, its size and its place in the optimizer and in DDP's
buckets never change, and nothing is re-allocated (no fragmentation). The storage is reserved once at the
largest size the schedule can need.

Under FSDP2 the storage belongs to the root unit (it is no decoder layer's parameter): it is gathered once
when the root's forward starts, stays gathered through the backward (FSDP2 keeps the root unsharded), and its
gradient is reduce-scattered with the root's. Its size is about the adapter's, small next to one decoder
layer of the base. Outside a forward, reads gather it and writes keep each rank's shard (``distributed.gathered``,
``distributed.write_whole``; tested with torch's ``fully_shard`` on two CPU processes, ``tests/test_bank.py``).

Auxiliary cores (every core but the layout's central one) are stored divided by ``aux_scale`` and multiplied
back in the contraction: under Adam, whose step ignores the gradient's scale, they then learn at
``aux_scale`` times the learning rate (OPF's separate learning rate), with no extra optimizer group.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from lora_over_trl.lora_over import mpo
from lora_over_trl.utils.distributed import gathered, write_whole

__all__ = ["BankedLinear", "FactorBank", "FactorHandle"]

GradObserver = Callable[[list[str], torch.Tensor], None]  # (a group's keys, dL/d(its contraction))


class BankedLinear(nn.Linear):
    """A LoRA factor's ``nn.Linear`` whose ``weight`` is its slice of the bank's contraction.

    The class is swapped in place (as ``torch.nn.utils.parametrize`` does), so ``isinstance(m, nn.Linear)``
    holds and PEFT's forward is unchanged. ``state_dict()`` writes the current contraction under the usual
    ``weight`` key: a checkpoint's adapter file is a standard LoRA adapter of the function being trained.
    """

    _lora_over_bank: FactorBank
    _lora_over_key: str

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._lora_over_bank.weight_of(self._lora_over_key)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self._lora_over_bank.contract_one(self._lora_over_key)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        # The bank's storage (saved beside it) is what defines this weight; the saved value is its contraction.
        if prefix + "weight" in unexpected_keys:
            unexpected_keys.remove(prefix + "weight")


class FactorHandle:
    """One factor of a bank, for inspection and tests: its layout, its stored cores (views), their gradients."""

    def __init__(self, bank: FactorBank, key: str) -> None:
        self.bank, self.key = bank, key

    @property
    def layout(self) -> mpo.MpoLayout:
        return self.bank.layouts[self.key]

    @property
    def aux_scale(self) -> float:
        return self.bank.aux_scale

    @property
    def aux_params(self) -> int:
        """Parameters beyond those of the plain factor."""
        return self.layout.aux_params()

    @property
    def cores(self) -> list[torch.Tensor]:
        """The stored cores: views of the bank's storage (in-place edits change the factor)."""
        return self.bank.stored_cores(self.key)

    def core_grads(self) -> list[torch.Tensor | None]:
        """The stored cores' gradients: views of the storage's ``.grad`` (``None`` before any backward)."""
        return self.bank.stored_cores(self.key, grad=True)

    def effective_cores(self) -> list[torch.Tensor]:
        """The cores whose contraction is the factor (``aux_scale`` applied to the auxiliary ones)."""
        return self.bank.effective_cores(self.key)

    def auxiliary_cores(self) -> list[torch.Tensor]:
        """All stored cores but the central one."""
        return [t for j, t in enumerate(self.cores) if j != self.layout.central]


class FactorBank(nn.Module):
    """The over-parameterized factors on one dtype and device, in one flat parameter.

    Args:
        reserve: elements to reserve for the storage (it grows when a change needs more).
        dtype, device: of the storage (those of the LoRA weights it replaces).
        aux_scale: learning-rate multiplier of the auxiliary cores under Adam (see the module docstring).
    """

    def __init__(self, reserve: int, *, dtype: torch.dtype, device: torch.device | str, aux_scale: float = 1.0):
        super().__init__()
        if not aux_scale > 0:
            raise ValueError(f"FactorBank: `aux_scale` must be > 0, got {aux_scale!r}")
        self.storage = nn.Parameter(torch.zeros(max(int(reserve), 0), dtype=dtype, device=device))
        self.aux_scale = float(aux_scale)
        self.layouts: dict[str, mpo.MpoLayout] = {}  # key -> layout, the whole plan
        self.groups: list[tuple[mpo.MpoLayout, list[str]]] = []  # storage order
        self.linears: dict[str, nn.Linear] = {}
        self.chunks: dict[str, list[tuple[int, tuple[int, ...]]]] = {}  # key -> per core: (flat offset, shape)
        self.grad_observer: GradObserver | None = None
        self.fresh: list[tuple[int, int]] = []  # (offset, size) of storage whose optimizer moments start anew
        self._views: dict[str, torch.Tensor] = {}
        self._views_key: tuple | None = None

    # ---- the plan ---------------------------------------------------------------------------------------

    @staticmethod
    def order(layouts: dict[str, mpo.MpoLayout]) -> list[tuple[mpo.MpoLayout, list[str]]]:
        """Groups in storage order: a pure function of the plan, so a checkpoint's plan gives its offsets back."""
        groups: dict[mpo.MpoLayout, list[str]] = {}
        for key in sorted(layouts):
            groups.setdefault(layouts[key], []).append(key)
        return sorted(groups.items(), key=lambda item: item[1][0])  # by first key: no two groups share one

    @staticmethod
    def numel(layouts) -> int:
        """Storage elements that a plan (an iterable of layouts) needs."""
        return sum(layout.num_params() for layout in layouts)

    def _chunks(self, groups) -> dict[str, list[tuple[int, tuple[int, ...]]]]:
        """Per key, per core position: (flat offset, core shape)."""
        chunks, offset = {}, 0
        for layout, keys in groups:
            for shape in layout.core_shapes():
                size = math.prod(shape)
                for i, key in enumerate(keys):
                    chunks.setdefault(key, []).append((offset + i * size, shape))
                offset += size * len(keys)
        return chunks

    def used(self) -> int:
        """Storage elements in use."""
        return self.numel(self.layouts.values())

    # ---- changing the plan --------------------------------------------------------------------------

    def repack(
        self,
        layouts: dict[str, mpo.MpoLayout],
        values: dict[str, list[torch.Tensor]],
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Make ``layouts`` the bank's plan, in place.

        Args:
            layouts: every factor the bank holds afterwards, with its layout.
            values: effective cores for factors that are new or change layout; every other key of ``layouts``
                must be in the bank already with the same layout, and keeps its values and optimizer moments.
            optimizer: whose per-element state of the storage (Adam's moments) follows the factors; the
                state of new factors starts at zero (see :meth:`seed_fresh_moments`). Its step count is the
                storage's and is kept.
        """
        with torch.no_grad():
            kept = [k for k in layouts if k not in values]
            stale = [k for k in kept if self.layouts.get(k) != layouts[k]]
            if stale:
                raise ValueError(f"FactorBank.repack: no values for new or changed factors {stale[:3]}")
            old = self.chunks
            groups = self.order(layouts)
            new = self._chunks(groups)
            needed = self.numel(layouts.values())
            size = max(needed, self.storage.numel())
            # (accelerate's AcceleratedOptimizer, what the Trainer hands callbacks, is read through: its `state` and
            # `param_groups` are the wrapped optimizer's)
            state = optimizer.state.get(self.storage, {}) if optimizer is not None else {}
            moments = [(name, t) for name, t in state.items() if torch.is_tensor(t) and t.shape == self.storage.shape]

            # Kept factors move as slice copies of runs that stay contiguous (a group's kept factors mostly do):
            # no per-element index tensors, whose int64 size (8 bytes per storage element, twice) would be the
            # re-allocation's peak memory.
            spans = sorted(
                (new[key][j][0], old[key][j][0], math.prod(shape))
                for key in kept
                for j, (_, shape) in enumerate(new[key])
            )
            runs: list[list[int]] = []
            for dst, src, n in spans:
                if runs and runs[-1][0] + runs[-1][2] == dst and runs[-1][1] + runs[-1][2] == src:
                    runs[-1][2] += n
                else:
                    runs.append([dst, src, n])

            def moved(flat: torch.Tensor, fill: dict[str, list[torch.Tensor]]) -> torch.Tensor:
                out = torch.zeros(size, dtype=flat.dtype, device=flat.device)
                for dst, src, n in runs:
                    out[dst : dst + n] = flat[src : src + n]
                for key, cores in fill.items():
                    for (offset, shape), core in zip(new[key], cores, strict=True):
                        out[offset : offset + math.prod(shape)] = core.reshape(-1).to(out)
                return out

            self._views, self._views_key = {}, None  # their graphs hold the storage's gradient accumulator
            stored = {key: self._to_stored(cores, layouts[key]) for key, cores in values.items()}
            zeros: dict[str, list[torch.Tensor]] = {}  # new factors' moments: left at zero
            if not layouts:  # the bank empties (a whole collapse): what its storage holds no longer matters
                pass
            elif size == self.storage.numel():
                data = moved(gathered(self.storage.detach()), stored)
                write_whole(self.storage, data)
                for _, tensor in moments:
                    write_whole(tensor, moved(gathered(tensor), zeros))
            else:  # a plan larger than the reservation: the same parameter object, with larger data (DDP would need
                # to be told: the schedules reserve the most they can need instead)
                # pragma: no mutate start (FSDP2 only)
                if hasattr(self.storage, "to_local"):
                    raise ValueError("FactorBank.repack: a sharded (FSDP) bank cannot grow past its reservation")
                # pragma: no mutate end
                self.storage.data = moved(self.storage.detach(), stored)
                for name, tensor in moments:
                    state[name] = moved(tensor, zeros)
            self.storage.grad = None
            self.layouts = dict(layouts)
            self.groups = groups
            self.chunks = new
            self.fresh = [(o, math.prod(shape)) for key in values for o, shape in new[key]]
            self._views_key = None

    def adopt(self, layouts: dict[str, mpo.MpoLayout]) -> None:
        """Take ``layouts`` as the plan of the values the storage already holds, moving nothing.

        For a resume whose loader wrote a checkpoint's storage (and its Adam moments) straight into the parameter:
        the values are laid out as the checkpoint's plan, which may differ from the one this bank was built with.

        Raises:
            ValueError: ``layouts`` names other factors than the bank holds, or needs more than its storage.
        """
        if set(layouts) != set(self.layouts) or self.numel(layouts.values()) > self.storage.numel():
            raise ValueError(
                f"FactorBank.adopt: the plan holds {len(layouts)} factors in {self.numel(layouts.values()):,} "
                f"elements; the bank {len(self.layouts)} in {self.storage.numel():,}"
            )
        self.layouts = dict(layouts)
        self.groups = self.order(layouts)
        self.chunks = self._chunks(self.groups)
        self._views, self._views_key = {}, None

    def seed_fresh_moments(self, optimizer: torch.optim.Optimizer) -> None:
        """Give new factors' Adam moments their first gradient, so their first step is a fresh Adam's first step.

        Call it once gradients are in and before ``optimizer.step()`` (``LoraOverCallback`` does, at
        ``on_pre_optimizer_step``). The storage has one step count for all its factors: a factor that entered
        at step ``t`` would otherwise have zero moments bias-corrected as if ``t`` steps old, and take steps
        3 to 6 times larger than Adam's for hundreds of steps. With ``m = (c1 - (1 - beta1)) g / beta1`` and
        ``v = (c2 - (1 - beta2)) g^2 / beta2`` (``c = 1 - beta^(t+1)``), Adam's update makes ``m / c1 = g`` and
        ``v / c2 = g^2``: the step is ``lr * g / |g|``, as for a new parameter, and the moments average
        gradients at their usual scale from then on. Optimizers without Adam's state are left alone.
        """
        with torch.no_grad():
            ranges, self.fresh = self.fresh, []
            state = optimizer.state.get(self.storage, {})
            grad = self.storage.grad
            if not ranges or grad is None or not {"exp_avg", "exp_avg_sq", "step"} <= set(state):
                return
            group = next(g for g in optimizer.param_groups if any(p is self.storage for p in g["params"]))
            beta1, beta2 = group["betas"]
            t = float(state["step"]) + 1
            factors = {"exp_avg": (1 - beta1**t - (1 - beta1)) / beta1}
            factors |= dict.fromkeys(("exp_avg_sq", "max_exp_avg_sq"), (1 - beta2**t - (1 - beta2)) / beta2)
            grad = gathered(grad)
            for name, factor in factors.items():
                if name not in state:
                    continue
                target = state[name]
                whole = gathered(target)  # under FSDP2 a gathered copy, written back as this rank's shard
                for offset, size in ranges:
                    g = grad[offset : offset + size]
                    whole[offset : offset + size] = (g if name == "exp_avg" else g * g) * factor
                if whole is not target:  # pragma: no mutate (FSDP2 only)
                    write_whole(target, whole)  # pragma: no mutate

    def _to_stored(self, cores: list[torch.Tensor], layout: mpo.MpoLayout) -> list[torch.Tensor]:
        if self.aux_scale == 1.0:
            return list(cores)
        return [t if j == layout.central else t / self.aux_scale for j, t in enumerate(cores)]

    def _to_effective(self, cores: list[torch.Tensor], central: int) -> list[torch.Tensor]:
        """Stored cores (a factor's or a group's) times ``aux_scale``, all but the central one."""
        if self.aux_scale == 1.0:
            return list(cores)
        return [t if j == central else t * self.aux_scale for j, t in enumerate(cores)]

    # ---- reading ------------------------------------------------------------------------------------

    def stored_cores(self, key: str, grad: bool = False) -> list[torch.Tensor]:
        """Views of the storage (or of its gradient) holding ``key``'s cores as stored."""
        flat = self.storage.grad if grad else self.storage.detach()  # detach shares the version counter
        flat = None if flat is None else gathered(flat)  # pragma: no mutate (FSDP2: outside a forward, a gathered copy)
        if flat is None:
            return [None] * self.layouts[key].num_cores
        return [flat[o : o + math.prod(s)].view(s) for o, s in self.chunks[key]]

    def effective_cores(self, key: str) -> list[torch.Tensor]:
        """``key``'s cores with ``aux_scale`` applied (their contraction is the factor)."""
        return self._to_effective(self.stored_cores(key), self.layouts[key].central)

    def contract_one(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``key``'s factor contracted now, detached (in float64 when asked: the collapse's reference)."""
        with torch.no_grad():
            cores = [t.to(dtype or t.dtype) for t in self.stored_cores(key)]
            return mpo.contract(self._to_effective(cores, self.layouts[key].central))

    def contract_group(self, keys: tuple[str, ...]) -> torch.Tensor:
        """The factors ``keys`` contracted now, detached, ``(n, p, q)``: one batched contraction when they are
        one of the bank's groups (the sensitivity statistic asks for a group's factors together)."""
        group = next((g for g in self.groups if tuple(g[1]) == tuple(keys)), None)
        if group is None:
            return torch.stack([self.contract_one(key) for key in keys])
        layout, _ = group
        with torch.no_grad():
            flat = gathered(self.storage.detach())
            cores = [flat[o : o + math.prod(s) * len(keys)].view(len(keys), *s) for o, s in self.chunks[keys[0]]]
            return mpo.contract(self._to_effective(cores, layout.central))

    def _state_key(self) -> tuple:
        s = self.storage
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), s._version, s.data_ptr(), s.device)

    def weight_of(self, key: str) -> torch.Tensor:
        """``key``'s current weight: its slice of this forward's contraction.

        Without a current one (a read outside the model's forward, after the storage changed or after backward
        spent the contraction) the factor is contracted alone and nothing is cached: a read inside a
        checkpointed region then does the same work when it is recomputed.
        """
        if self._views_key == self._state_key():
            return self._views[key]
        cores = [self.storage[o : o + math.prod(s)].view(s) for o, s in self.chunks[key]]
        return mpo.contract(self._to_effective(cores, self.layouts[key].central))

    def prepare_forward(self) -> None:
        """Contract now unless this forward can reuse the last contraction (same cores, same grad mode, and
        with gradients on, not yet spent by a backward): the model's forward pre-hook calls this."""
        if self._views_key != self._state_key():
            self.refresh()

    def refresh(self) -> None:
        """Contract every group (one batched contraction each) and serve the slices to the LoRA weights.

        Called once at the start of every forward of the model (a pre-hook), outside any checkpointed
        region, so gradient checkpointing's recomputation reads the same tensors. With gradients on, each
        forward gets its own contraction (each backward frees its graph); with them off the result is
        reused until the storage changes (generation reads the weights at every token).
        """
        sizes = [layout.num_params() * len(keys) for layout, keys in self.groups]
        # pragma: no mutate start (FSDP2 only)
        flat = self.storage if not hasattr(self.storage, "full_tensor") else gathered(self.storage.detach())
        # pragma: no mutate end
        pieces = torch.split(flat, [*sizes, flat.numel() - sum(sizes)])
        views: dict[str, torch.Tensor] = {}
        for (layout, keys), piece in zip(self.groups, pieces, strict=False):
            shapes = layout.core_shapes()
            cores = torch.split(piece, [math.prod(s) * len(keys) for s in shapes])
            cores = [c.view(len(keys), *s) for c, s in zip(cores, shapes, strict=True)]
            weights = mpo.contract(self._to_effective(cores, layout.central))  # (n, p, q)
            if weights.requires_grad:
                weights.register_hook(self._spent)
                if self.grad_observer is not None:
                    weights.register_hook(functools.partial(self.grad_observer, keys))
            views.update(zip(keys, weights.unbind(0), strict=True))
        self._views, self._views_key = views, self._state_key()

    def _spent(self, grad: torch.Tensor) -> None:
        # Backward has reached this forward's contraction: its graph is freed; the next read contracts anew.
        self._views_key = None

    def __getstate__(self) -> dict:
        # The cached slices are non-leaf tensors (no deep copy, no pickling); they are only a cache.
        return {**self.__dict__, "_views": {}, "_views_key": None, "grad_observer": None}

    # ---- the LoRA weights -----------------------------------------------------------------------------

    def attach(self, key: str, linear: nn.Linear) -> None:
        """Make ``linear.weight`` read ``key``'s slice; its own weight tensor is dropped (the bank holds it)."""
        del linear._parameters["weight"]
        object.__setattr__(linear, "_lora_over_bank", self)  # a plain reference, not a submodule
        object.__setattr__(linear, "_lora_over_key", key)
        linear.__class__ = BankedLinear
        self.linears[key] = linear

    def detach_linear(self, key: str, weight: torch.Tensor, requires_grad: bool) -> nn.Parameter:
        """Give ``key``'s linear a plain weight again (a new ``Parameter`` holding ``weight``)."""
        linear = self.linears.pop(key)
        linear.__class__ = nn.Linear
        del linear.__dict__["_lora_over_bank"], linear.__dict__["_lora_over_key"]
        linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
        return linear.weight

    def extra_repr(self) -> str:
        scale = f", aux_scale={self.aux_scale:g}" if self.aux_scale != 1.0 else ""
        return (
            f"factors={len(self.layouts)}, groups={len(self.groups)}, used={self.used():,}/"
            f"{self.storage.numel():,}{scale}"
        )
