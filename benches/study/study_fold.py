"""The study's wide-rank arm (``lora_wide``): LoRA trained at twice the rank, folded back to the rank by a truncated
SVD of each module's ``B A``. Unlike a tensor-train of the factors, which spans exactly what ``B A`` spans and
collapses without error, a wider rank does enlarge the space trained in, and folding it back loses what the top
``r`` singular directions do not hold; this arm measures both.

Every score of the arm is of the folded model: while a score runs, each LoRA module's factors are replaced by
``B' = [U_r S_r, 0]`` and ``A' = [V_r^T; 0]`` (zero-padded to the trained rank, so PEFT's layer runs unchanged), which
compute exactly what a rank-``r`` adapter of ``U_r S_r`` and ``V_r^T`` computes; the trained factors come back after.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def lora_pairs(model) -> Iterator[tuple[object, object]]:
    """``(lora_A, lora_B)`` weight pairs of every LoRA module (the default adapter)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            yield module.lora_A["default"].weight, module.lora_B["default"].weight


def truncate(weight_a, weight_b, rank: int) -> tuple[object, object, float]:
    """The rank-``rank`` factors of ``B A`` (best in Frobenius norm, Eckart-Young) zero-padded to the trained rank,
    and the relative error ``||B A - B' A'||_F / ||B A||_F`` (0 for ``B A = 0``)."""
    import torch

    product = weight_b.detach().double() @ weight_a.detach().double()
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    new_b, new_a = torch.zeros_like(weight_b), torch.zeros_like(weight_a)
    new_b[:, :rank] = (u[:, :rank] * s[:rank]).to(weight_b.dtype)
    new_a[:rank] = vh[:rank].to(weight_a.dtype)
    total = float(s.square().sum())
    error = (float(s[rank:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return new_a, new_b, error


@contextmanager
def folded(model, rank: int) -> Iterator[list[float]]:
    """Inside: the model with every LoRA module folded to ``rank``; yields the modules' relative fold errors."""
    import torch

    pairs = list(lora_pairs(model))
    kept = [(a.detach().clone(), b.detach().clone()) for a, b in pairs]
    errors = []
    with torch.no_grad():
        for weight_a, weight_b in pairs:
            new_a, new_b, error = truncate(weight_a, weight_b, rank)
            weight_a.copy_(new_a)
            weight_b.copy_(new_b)
            errors.append(error)
    try:
        yield errors
    finally:
        with torch.no_grad():
            for (weight_a, weight_b), (old_a, old_b) in zip(pairs, kept, strict=True):
                weight_a.copy_(old_a)
                weight_b.copy_(old_b)


def as_deployed(spec: dict) -> Callable[[Callable[[object], dict]], Callable[[object], dict]]:
    """Decorate a scoring function so that it scores what the arm deploys: for ``lora_wide`` the model folded to
    ``spec['rank']`` (its scores gain ``fold_error_mean`` / ``fold_error_max``), for every other arm the model as
    it is."""

    def decorate(score: Callable[[object], dict]) -> Callable[[object], dict]:
        if spec["method"] != "lora_wide":
            return score

        @functools.wraps(score)
        def score_folded(model) -> dict:
            with folded(model, spec["rank"]) as errors:
                scores = score(model)
            return {**scores, "fold_error_mean": sum(errors) / len(errors), "fold_error_max": max(errors)}

        return score_folded

    return decorate
