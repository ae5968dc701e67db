"""What a LoRA update does to each weight matrix: spectrum, effective and stable rank, alignment, intruders.

For a module with base weight ``W0`` and update ``dW = s B A`` (rank ``r``):

- singular values of ``dW``, from QR factors of ``B`` and ``A^T`` and one ``r x r`` SVD (never ``m x n``);
- effective rank ``exp(H(p))``, ``p_i = sigma_i / sum sigma`` (Roy & Vetterli, 2007);
- stable rank ``||dW||_F^2 / sigma_1^2``;
- alignment: the share of ``||dW||_F^2`` inside the span of ``W0``'s top-``k`` left and right singular vectors,
  ``||U_k^T dW V_k||_F^2 / ||dW||_F^2``;
- intruder dimensions (Shuttleworth et al., arXiv 2410.21228): among the top-``k`` left singular vectors of
  ``W0 + dW``, those whose largest absolute cosine similarity with every left singular vector of ``W0`` is
  below ``threshold``.

Pure ``torch.linalg``; :mod:`lora_over_trl.analyze` feeds it one module at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["ModuleSpectrum", "update_singular_values", "module_spectrum", "effective_rank", "stable_rank"]


@dataclass
class ModuleSpectrum:
    """The numbers of one module (see the module docstring)."""

    module: str
    rank: int
    singular_values: list[float]
    effective_rank: float
    stable_rank: float
    alignment: float | None
    intruders: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def update_singular_values(b: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of ``scaling * b @ a`` (``b``: ``m x r``, ``a``: ``r x n``), largest first, in float64."""
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    return torch.linalg.svdvals(scaling * r_b @ r_a.T)


def effective_rank(singular_values: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalized singular values; 0 for a zero update."""
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values[singular_values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(singular_values: torch.Tensor) -> float:
    """``||dW||_F^2 / sigma_1^2``; 0 for a zero update."""
    top = singular_values.max() if singular_values.numel() else torch.tensor(0.0)
    return float((singular_values**2).sum() / top**2) if top > 0 else 0.0


def module_spectrum(
    name: str,
    b: torch.Tensor,
    a: torch.Tensor,
    scaling: float,
    base: torch.Tensor | None = None,
    *,
    top_k: int = 10,
    threshold: float = 0.5,
) -> ModuleSpectrum:
    """All numbers for one module; alignment and intruders need ``base`` (``W0``, ``m x n``)."""
    sigma = update_singular_values(b, a, scaling)
    alignment = intruders = None
    if base is not None:
        w0 = base.double()
        delta = scaling * b.double() @ a.double()
        u0, _, v0h = torch.linalg.svd(w0, full_matrices=False)
        k = min(top_k, u0.shape[1])
        inside = u0[:, :k].T @ delta @ v0h[:k].T
        energy = (delta**2).sum()
        alignment = float((inside**2).sum() / energy) if energy > 0 else 0.0
        u, _, _ = torch.linalg.svd(w0 + delta, full_matrices=False)
        similarity = (u[:, :k].T @ u0).abs().max(dim=1).values  # best match of each top vector in W0's basis
        intruders = int((similarity < threshold).sum())
    return ModuleSpectrum(
        module=name,
        rank=int((sigma > sigma.max() * 1e-10).sum()) if sigma.numel() and sigma.max() > 0 else 0,
        singular_values=[float(s) for s in sigma],
        effective_rank=effective_rank(sigma),
        stable_rank=stable_rank(sigma),
        alignment=alignment,
        intruders=intruders,
    )
