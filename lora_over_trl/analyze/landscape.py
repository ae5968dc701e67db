"""Loss landscapes around a trained adapter (Li et al., 2018, "Visualizing the Loss Landscape of Neural Nets").

The loss is evaluated at ``theta + alpha d1 (+ beta d2)`` on a grid, where ``theta`` are the adapter's
parameters and ``d1``, ``d2`` random directions, *filter-normalized*: each row of each direction tensor is
scaled to the norm of the same row of the parameter, so the picture does not depend on the parameters'
scale. Sharpness summaries (the loss rise at the grid's radius) make runs comparable in a table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["filter_normalized_direction", "landscape_grid", "sharpness"]


def filter_normalized_direction(params: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """A Gaussian direction with every row rescaled to the norm of the parameter's row (zero rows stay zero)."""
    direction = []
    for param in params:
        d = torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.device, param.dtype)
        rows_d = d.reshape(d.shape[0], -1) if d.dim() > 1 else d.reshape(1, -1)
        rows_p = param.detach().reshape(rows_d.shape)
        scale = rows_p.norm(dim=1, keepdim=True) / rows_d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        direction.append((rows_d * scale).reshape(param.shape))
    return direction


@torch.no_grad()
def landscape_grid(
    loss: Callable[[], float],
    params: Sequence[torch.Tensor],
    directions: Sequence[Sequence[torch.Tensor]],
    coordinates: Sequence[float],
    progress: Callable[[int], None] | None = None,
) -> list:
    """``loss()`` at ``params + sum_i c_i directions[i]`` for every point of the grid ``coordinates ** dims``.

    Returns a list (one direction) or a list of rows (two: ``rows[i][j]`` at ``(coordinates[i], coordinates[j])``).
    The parameters are restored exactly afterwards.
    """
    original = [p.detach().clone() for p in params]

    def at(*steps: float) -> float:
        for param, start, *parts in zip(params, original, *directions, strict=True):
            param.copy_(start)
            for step, part in zip(steps, parts, strict=True):
                param.add_(part, alpha=step)
        value = loss()
        if progress is not None:
            progress(1)
        return value

    try:
        if len(directions) == 1:
            return [at(a) for a in coordinates]
        return [[at(a, b) for b in coordinates] for a in coordinates]
    finally:
        for param, start in zip(params, original, strict=True):
            param.copy_(start)


def sharpness(losses: list, coordinates: Sequence[float]) -> dict[str, float]:
    """Loss at the center, and its rise at the grid's radius: mean over the ends of each axis, and the most."""
    center = len(coordinates) // 2
    if isinstance(losses[0], list):
        middle = losses[center][center]
        ends = [losses[0][center], losses[-1][center], losses[center][0], losses[center][-1]]
        highest = max(max(row) for row in losses)
    else:
        middle = losses[center]
        ends = [losses[0], losses[-1]]
        highest = max(losses)
    return {
        "center_loss": middle,
        "radius": float(coordinates[-1]),
        "mean_rise_at_radius": sum(ends) / len(ends) - middle,
        "max_rise": highest - middle,
    }
