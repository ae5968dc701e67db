"""The allocation history as a picture: modules (rows) x decisions (columns), filled where over-parameterized."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["allocation_matrix", "draw_allocation"]

logger = logging.getLogger(__name__)


def allocation_matrix(history: list[dict[str, Any]]) -> tuple[list[str], list[int], list[list[float]]]:
    """``(modules, steps, rows)``: ``rows[i][j]`` is the share of the top capacity module ``i`` held after
    decision ``j`` (1 or 0 with one level; ``k / levels`` with several)."""
    decisions = [h for h in history if "modules" in h]
    modules = sorted({m for h in decisions for m in h["modules"]})  # a module that left was in before
    steps = [h["step"] for h in decisions]
    top = max((c for h in decisions for c in h.get("capacities", {}).values()), default=0.0)

    def held(decision: dict[str, Any], module: str) -> float:
        if "capacities" in decision and top > 0:
            return decision["capacities"].get(module, 0.0) / top
        return float(module in decision["modules"])

    rows = [[held(h, m) for h in decisions] for m in modules]
    return modules, steps, rows


def draw_allocation(history: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Write the heatmap PNG; ``None`` when the history holds no decision, or (with a warning) when matplotlib
    cannot be imported: the callback draws at ``on_train_end``, before the adapter is saved, and a picture is not
    worth a finished run."""
    modules, steps, rows = allocation_matrix(history)
    if not steps or not modules:
        return None
    try:
        import matplotlib
    except ImportError as err:
        logger.warning("%s not drawn: matplotlib cannot be imported (%s); pip install matplotlib", path, err)
        return None

    # The drawing below is layout (sizes, fonts, labels, backend name): cosmetic, left out of mutation testing
    # (docs/testing.md). What is drawn comes from allocation_matrix, tested exactly.
    # pragma: no mutate start
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    height = max(3.0, 0.18 * len(modules) + 1.5)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(steps) + 3.5), height))
    ax.imshow(rows, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
    ax.set_yticks(range(len(modules)), [m.removeprefix("model.") for m in modules], fontsize=6)
    ax.set_xlabel("optimizer step of the decision")
    ax.set_title("LoRA-Over allocation (green: over-parameterized, darker: more capacity)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    # pragma: no mutate end
    return Path(path)
