"""Budgeted choice of modules to over-parameterize: a pure function of scores and costs.

OPF (Gao et al., 2023) over-parameterized the top-N matrices of each type by importance; here every chosen
module gets the same capacity, and modules are taken in order of score while their auxiliary parameters fit
the budget, either over all modules (``"global"``) or per module type with the budget split in proportion
to each type's total cost (``"per_type"``; what no type can use goes to the best remaining modules).
The budget is never exceeded.
"""

from __future__ import annotations

__all__ = ["allocate", "module_type"]


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
