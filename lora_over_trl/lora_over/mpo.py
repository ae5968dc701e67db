"""Matrix product operators (tensor-train matrices): the math of LoRA-Over in plain torch.

A ``p x q`` matrix ``F`` with ``p = p_1 ... p_k`` and ``q = q_1 ... q_k`` is stored as ``k`` cores
``T_j`` of shape ``(d_{j-1}, p_j, q_j, d_j)`` with ``d_0 = d_k = 1``::

    F[(i_1..i_k), (j_1..j_k)] = T_1[:, i_1, j_1, :] @ T_2[:, i_2, j_2, :] @ ... @ T_k[:, i_k, j_k, :]

Following OPF (Gao et al., ACL 2023) one core is *central* and large; the others are small *auxiliary*
cores. :func:`decompose` puts ``F`` into the central core unchanged and makes every auxiliary core an
identity embedding of its indices, so the contraction reproduces ``F`` bit for bit. The bond dimensions
that this needs are the *exact* bonds (:func:`exact_bonds`); bonds beyond them are over-parameterization:
extra parameters with no extra expressive power, which change the optimizer's path (Arora et al., 2018).

A padded bond slot must not freeze: if both of its sides were zero, every gradient through it would be
zero. So the side farther from the central core is zero (the function is unchanged) and the side nearer
to it is random (the zero side receives gradient from the first step on).

Nothing here knows about PEFT or LoRA; :mod:`lora_over_trl.lora_over.bank` builds on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = [
    "MpoLayout",
    "choose_layout",
    "exact_bonds",
    "fit_bonds",
    "decompose",
    "contract",
    "grow",
    "truncate",
]


@dataclass(frozen=True)
class MpoLayout:
    """How a ``p x q`` matrix is split into cores.

    Attributes:
        rows: ``(p_1, ..., p_k)``, product ``p``.
        cols: ``(q_1, ..., q_k)``, product ``q``.
        bonds: the ``k - 1`` inner bond dimensions ``(d_1, ..., d_{k-1})``.
        central: index of the central (large) core.
    """

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    bonds: tuple[int, ...]
    central: int

    def __post_init__(self) -> None:
        k = len(self.rows)
        problems = []
        if k < 1 or len(self.cols) != k:
            problems.append(f"rows and cols need the same positive length, got {self.rows} and {self.cols}")
        if len(self.bonds) != max(k - 1, 0):
            problems.append(f"{k} cores need {k - 1} bonds, got {self.bonds}")
        if any(n < 1 for n in (*self.rows, *self.cols, *self.bonds)):
            problems.append(f"all dimensions must be >= 1, got rows={self.rows} cols={self.cols} bonds={self.bonds}")
        if not 0 <= self.central < max(k, 1):
            problems.append(f"`central` must index one of the {k} cores, got {self.central}")
        if problems:
            raise ValueError("invalid MPO layout: " + "; ".join(problems))

    @property
    def num_cores(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        """The shape ``(p, q)`` of the matrix the cores contract to."""
        return math.prod(self.rows), math.prod(self.cols)

    def core_shapes(self) -> list[tuple[int, int, int, int]]:
        full = (1, *self.bonds, 1)
        return [(full[j], self.rows[j], self.cols[j], full[j + 1]) for j in range(self.num_cores)]

    def num_params(self) -> int:
        """Parameters of all cores together."""
        return sum(math.prod(s) for s in self.core_shapes())

    def aux_params(self) -> int:
        """Parameters beyond those of the plain matrix: the over-parameterization."""
        p, q = self.shape
        return self.num_params() - p * q


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _aux_split(p: int, q: int, aux_size: int, cores_left: int) -> tuple[int, int]:
    """The largest ``(p_j, q_j)`` with ``p_j | p``, ``q_j | q`` and ``p_j q_j <= aux_size``; balanced on ties.

    With ``cores_left`` auxiliary cores still to fill (this one included), the core takes at most the
    ``(cores_left + 1)``-th root of what is left, so the central core ends up the largest.
    """
    aux_size = min(aux_size, int((p * q) ** (1.0 / (cores_left + 1)) + 1e-9))
    best = (1, 1)
    for a in _divisors(p):
        if a > aux_size:
            break
        for b in _divisors(q):
            if a * b > aux_size:
                break
            key = (a * b, -abs(math.log(a) - math.log(b)))
            if key > (best[0] * best[1], -abs(math.log(best[0]) - math.log(best[1]))):
                best = (a, b)
    return best


def exact_bonds(rows: tuple[int, ...], cols: tuple[int, ...], central: int) -> tuple[int, ...]:
    """Bonds at which auxiliary cores are identity embeddings and the central core holds the whole matrix.

    Bond ``j`` (between cores ``j`` and ``j + 1``) carries all indices on the far side of the central core:
    ``prod_{i <= j} p_i q_i`` left of it, ``prod_{i > j} p_i q_i`` right of it.
    """
    sizes = [p * q for p, q in zip(rows, cols, strict=True)]
    return tuple(math.prod(sizes[: j + 1]) if j < central else math.prod(sizes[j + 1 :]) for j in range(len(sizes) - 1))


def choose_layout(p: int, q: int, num_cores: int = 2, aux_size: int = 16) -> MpoLayout:
    """Split a ``p x q`` matrix into one central core and ``num_cores - 1`` small auxiliary cores.

    Auxiliary cores take the largest divisors ``p_j | p``, ``q_j | q`` whose product ``p_j q_j`` over the
    auxiliary cores on each side of the centre stays within ``aux_size`` (and never more than the central
    core keeps); the central core keeps the rest. Prime or exhausted dimensions give ``p_j = q_j = 1`` (the core is then
    a square matrix on the bond), so every shape works. Bonds are the exact ones.

    Example:
        >>> choose_layout(16, 4096)
        MpoLayout(rows=(4, 4), cols=(4, 1024), bonds=(16,), central=1)
    """
    if p < 1 or q < 1 or num_cores < 2 or aux_size < 1:
        raise ValueError(
            f"choose_layout needs p, q, aux_size >= 1 and num_cores >= 2, got {p}, {q}, {aux_size}, {num_cores}"
        )
    central = num_cores // 2
    rows, cols = [1] * num_cores, [1] * num_cores
    rest_p, rest_q = p, q
    # Fill auxiliary cores from the outside in, so the central core sits between them. Chained auxiliary
    # cores on one side multiply their exact bonds, so `aux_size` bounds their product, side by side.
    order = sorted((j for j in range(num_cores) if j != central), key=lambda j: abs(j - central), reverse=True)
    side_budget = {-1: aux_size, 1: aux_size}
    for i, j in enumerate(order):
        side = -1 if j < central else 1
        on_side = sum(1 for j2 in order[i:] if (j2 < central) == (j < central))
        limit = int(side_budget[side] ** (1.0 / on_side) + 1e-9)
        rows[j], cols[j] = _aux_split(rest_p, rest_q, limit, len(order) - i)
        side_budget[side] //= rows[j] * cols[j]
        rest_p //= rows[j]
        rest_q //= cols[j]
    rows[central], cols[central] = rest_p, rest_q
    return MpoLayout(tuple(rows), tuple(cols), exact_bonds(tuple(rows), tuple(cols), central), central)


def fit_bonds(layout: MpoLayout, max_aux_params: int) -> MpoLayout | None:
    """The layout with the largest bonds ``ceil(t * exact)``, ``t >= 1``, whose ``aux_params()`` fit the budget.

    Returns ``None`` when even the exact bonds exceed ``max_aux_params``.
    """
    exact = exact_bonds(layout.rows, layout.cols, layout.central)

    def scaled(t: float) -> MpoLayout:
        return replace(layout, bonds=tuple(math.ceil(t * e - 1e-9) for e in exact))

    if scaled(1.0).aux_params() > max_aux_params:
        return None
    low, high = 1.0, 2.0
    while scaled(high).aux_params() <= max_aux_params:
        low, high = high, high * 2
    for _ in range(60):  # aux_params grows monotonically in t: bisect to the last t that fits
        mid = (low + high) / 2
        low, high = (mid, high) if scaled(mid).aux_params() <= max_aux_params else (low, mid)
    return scaled(low)


def contract(cores: list[torch.Tensor]) -> torch.Tensor:
    """Contract cores ``(..., d_{j-1}, p_j, q_j, d_j)`` into the ``(..., p, q)`` matrices they represent.

    Leading dimensions are a batch: factors with one layout contract together, in one matmul per core.
    """
    *batch, _, p, q, d = cores[0].shape
    result = cores[0].reshape(*batch, p, q, d)
    for core in cores[1:]:
        rows, cols, bond = result.shape[-3:]
        p, q, e = core.shape[-3:]
        # (P Q, d) @ (d, p q e) -> (P, Q, p, q, e) -> (P, p, Q, q, e): one matmul and one reordering copy
        merged = result.reshape(*batch, rows * cols, bond) @ core.reshape(*batch, bond, p * q * e)
        merged = merged.reshape(*batch, rows, cols, p, q, e).transpose(-4, -3)
        result = merged.reshape(*batch, rows * p, cols * q, e)
    return result.squeeze(-1)


def _identity_core(shape: tuple[int, int, int, int], like: torch.Tensor) -> torch.Tensor:
    """An auxiliary core at exact bonds: a one-to-one map of its indices onto the bond nearer the centre.

    Left of the centre the core is ``(left * p * q) x right`` with ``right = left * p * q``; right of it,
    ``left x (p * q * right)`` with ``left = p * q * right``. Either way an identity matrix, reshaped.
    """
    n = math.isqrt(math.prod(shape))
    return torch.eye(n, dtype=like.dtype, device=like.device).reshape(shape)


def decompose(
    matrix: torch.Tensor,
    layout: MpoLayout,
    *,
    std: float,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Cores in ``layout`` that contract to ``matrix`` exactly (bit for bit).

    The central core holds ``matrix`` (reordered), the auxiliary cores are identity embeddings, and bond
    slots beyond the exact bonds are padded as :func:`grow` does, with random values of ``std``.

    Raises:
        ValueError: the matrix does not have the layout's shape, or a bond is below the exact one.
    """
    if tuple(matrix.shape) != layout.shape:
        raise ValueError(f"decompose: matrix of shape {tuple(matrix.shape)} does not fit layout shape {layout.shape}")
    exact = exact_bonds(layout.rows, layout.cols, layout.central)
    if any(b < e for b, e in zip(layout.bonds, exact, strict=True)):
        raise ValueError(f"decompose: bonds {layout.bonds} are below the exact bonds {exact}; use truncate()")
    k, c = layout.num_cores, layout.central
    full = (1, *exact, 1)
    cores = []
    for j in range(k):
        shape = (full[j], layout.rows[j], layout.cols[j], full[j + 1])
        if j == c:
            # (p_1..p_k, q_1..q_k) -> (p_1, q_1, ..., p_k, q_k): row-major flattening then matches the embeddings.
            t = matrix.reshape(*layout.rows, *layout.cols)
            t = t.permute(*[i for j2 in range(k) for i in (j2, k + j2)])
            cores.append(t.reshape(shape).clone())
        else:
            cores.append(_identity_core(shape, like=matrix))
    return grow(cores, layout, std=std, generator=generator)


def grow(
    cores: list[torch.Tensor],
    layout: MpoLayout,
    *,
    std: float,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Pad bonds up to ``layout.bonds`` without changing the contraction.

    A new slot of bond ``j`` is zero in the core farther from the central core and random (``N(0, std^2)``)
    in the nearer one, so the function is unchanged and the zero side gets gradient at once.
    """
    cores = list(cores)
    for j, new in enumerate(layout.bonds):
        old = cores[j].shape[3]
        if new < old:
            raise ValueError(f"grow: bond {j} would shrink from {old} to {new}; use truncate()")
        if new == old:
            continue
        far_is_left = j < layout.central  # the left core (j) is farther from the centre than the right (j + 1)
        left, right = cores[j], cores[j + 1]
        left_pad = torch.zeros(*left.shape[:3], new - old, dtype=left.dtype, device=left.device)
        right_pad = torch.zeros(new - old, *right.shape[1:], dtype=right.dtype, device=right.device)
        noisy = right_pad if far_is_left else left_pad
        noisy.copy_(torch.randn(noisy.shape, generator=generator, dtype=torch.float64).to(noisy) * std)
        cores[j] = torch.cat([left, left_pad], dim=3)
        cores[j + 1] = torch.cat([right, right_pad], dim=0)
    return cores


def truncate(
    cores: list[torch.Tensor],
    layout: MpoLayout,
    *,
    std: float,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], float]:
    """Re-decompose the cores into ``layout.bonds`` by TT-rounding (QR sweep, then truncated SVDs).

    Bonds may go up or down; a bond larger than the rank its unfolding needs is padded as :func:`grow`
    does. Work is done in float64.

    Returns:
        The new cores (in the input dtype) and the relative Frobenius error of their contraction against
        the old one (absolute when the old contraction is zero).
    """
    dtype = cores[0].dtype
    work = [t.detach().to(torch.float64) for t in cores]
    k = len(work)
    # Right-to-left: make cores 1..k-1 row-orthonormal, pushing the norm into core 0.
    for j in range(k - 1, 0, -1):
        d_left = work[j].shape[0]
        q, r = torch.linalg.qr(work[j].reshape(d_left, -1).T)  # M^T = Q R  =>  M = R^T Q^T
        work[j] = q.T.reshape(q.shape[1], *work[j].shape[1:])
        work[j - 1] = torch.einsum("apqd,de->apqe", work[j - 1], r.T)
    # Left-to-right: truncated SVD of each left unfolding.
    for j in range(k - 1):
        shape = work[j].shape
        u, s, vh = torch.linalg.svd(work[j].reshape(-1, shape[3]), full_matrices=False)
        keep = min(layout.bonds[j], s.numel())
        work[j] = u[:, :keep].reshape(*shape[:3], keep)
        work[j + 1] = torch.einsum("de,epqf->dpqf", s[:keep, None] * vh[:keep], work[j + 1])
    work = grow(work, layout, std=std, generator=generator)
    before = contract([t.detach().to(torch.float64) for t in cores])
    after = contract(work)
    scale = torch.linalg.norm(before)
    error = torch.linalg.norm(after - before) / (scale if scale > 0 else 1.0)
    return [t.to(dtype) for t in work], float(error)
