"""Budgeted choice of modules to over-parameterize: a pure function of scores and costs.

OPF (Gao et al., 2023) over-parameterized the top-N matrices of each type by importance; here every chosen
module gets the same capacity, and modules are taken in order of score while their auxiliary parameters fit
the budget, either over all modules (``"global"``) or per module type with the budget split in proportion
to each type's total cost (``"per_type"``; what no type can use goes to the best remaining modules).
The budget is never exceeded.

With several capacity levels (:func:`allocate_levels`), each module's share of the budget follows its
score (as AdaLoRA spreads rank by importance): it gets the highest level whose cost fits that share, then
what is left raises modules in score order to the highest level that still fits.
"""

from __future__ import annotations

__all__ = ["allocate", "allocate_levels", "module_type"]


def module_type(name: str) -> str:
    """The last component of a module name: ``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def _greedy(names: list[str], scores: dict[str, float], costs: dict[str, int], budget: float) -> set[str]:
    chosen, spent = set(), 0
    for name in sorted(names, key=lambda n: (-scores.get(n, 0.0), n)):  # ties broken by name: deterministic
        if 0 < costs[name] <= budget - spent:
            chosen.add(name)
            spent += costs[name]
    return chosen


def allocate(scores: dict[str, float], costs: dict[str, int], budget: int, scope: str = "global") -> set[str]:
    """Modules to over-parameterize.

    Args:
        scores: importance per module (higher first); missing modules count as 0.
        costs: auxiliary parameters each module needs when over-parameterized (0: cannot be).
        budget: the most auxiliary parameters in total.
        scope: ``"global"`` or ``"per_type"``.

    Returns:
        The chosen module names; their costs add up to at most ``budget``.
    """
    if scope == "global":
        return _greedy(list(costs), scores, costs, budget)
    types: dict[str, list[str]] = {}
    for name in costs:
        types.setdefault(module_type(name), []).append(name)
    total = sum(costs.values()) or 1
    chosen: set[str] = set()
    for names in types.values():
        share = budget * sum(costs[n] for n in names) / total
        chosen |= _greedy(names, scores, costs, share)
    # What no type could use (a share smaller than its cheapest module) goes to the best of the rest.
    left = budget - sum(costs[n] for n in chosen)
    return chosen | _greedy([n for n in costs if n not in chosen], scores, costs, left)


def _levels(names, scores, costs, budget: float, chosen: dict[str, int] | None = None) -> dict[str, int]:
    """Levels for ``names`` in proportion to their scores, then what is left raises the best ones."""
    chosen = dict(chosen or {})
    total = sum(max(scores.get(n, 0.0), 0.0) for n in names if n not in chosen)
    spent = sum(costs[n][chosen[n] - 1] for n in chosen)
    if total > 0:
        for name in (n for n in names if n not in chosen):
            share = (budget - spent) * max(scores.get(name, 0.0), 0.0) / total
            fitting = [level for level, cost in enumerate(costs[name], 1) if 0 < cost <= share]
            if fitting:
                chosen[name] = fitting[-1]
    left = budget - sum(costs[n][chosen[n] - 1] for n in chosen)
    for name in sorted(names, key=lambda n: (-scores.get(n, 0.0), n)):  # the rest, best first
        now = costs[name][chosen[name] - 1] if name in chosen else 0
        fitting = [level for level, cost in enumerate(costs[name], 1) if 0 < cost and cost - now <= left]
        if fitting and fitting[-1] > chosen.get(name, 0):
            left -= costs[name][fitting[-1] - 1] - now
            chosen[name] = fitting[-1]
    return chosen


def allocate_levels(
    scores: dict[str, float], costs: dict[str, list[int]], budget: int, scope: str = "global"
) -> dict[str, int]:
    """Capacity level (1-based) of each module to over-parameterize.

    Args:
        scores: importance per module (higher first); missing modules count as 0.
        costs: auxiliary parameters each module needs at each level, lowest level first (0: cannot be).
        budget: the most auxiliary parameters in total.
        scope: ``"global"`` or ``"per_type"`` (each type's share in proportion to its top-level cost).

    Returns:
        ``{module: level}`` for the chosen modules; their costs add up to at most ``budget``.
    """
    names = list(costs)
    if scope == "global":
        return _levels(names, scores, costs, budget)
    types: dict[str, list[str]] = {}
    for name in names:
        types.setdefault(module_type(name), []).append(name)
    total = sum(c[-1] for c in costs.values()) or 1
    chosen: dict[str, int] = {}
    for group in types.values():
        chosen |= _levels(group, scores, costs, budget * sum(costs[n][-1] for n in group) / total)
    # what no type could use raises the best modules of any type
    return _levels(names, scores, costs, budget, chosen)
