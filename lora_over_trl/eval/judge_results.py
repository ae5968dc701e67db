"""MT-Bench scores from FastChat ``model_judgment`` rows: the tables of FastChat's ``show_result.py``, by category
too, and a picture per category.

Single grading: rows with score -1 (no parsable rating, or a refused request) are left out of the means, as
``show_result.py`` leaves them out, and counted. Pairwise: rows where either order has no verdict are left out and
counted; a win needs the same winner in both orders; a tie in either order, or two orders that disagree, is a
tie. ``win_rate_adjusted`` counts a tie as half a win.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

__all__ = ["read_rows", "single_scores", "pairwise_rates", "results_markdown", "plot_categories"]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a judgment file ([] when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def single_scores(rows: list[dict[str, Any]], categories: dict[int, str], model: str) -> dict[str, Any]:
    """``model``'s mean rating overall, per turn and per category (and category x turn), with the row counts."""
    mine = [row for row in rows if row["model"] == model]
    rated = [row for row in mine if row["score"] != -1]
    by_category: dict[str, list[float]] = defaultdict(list)
    by_category_turn: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rated:
        category = categories[row["question_id"]]
        by_category[category].append(row["score"])
        by_category_turn[category][row["turn"]].append(row["score"])

    def average(values: list[float]) -> float | None:
        return round(mean(values), 4) if values else None

    return {
        "model": model,
        "score": average([row["score"] for row in rated]),
        "turn_1": average([row["score"] for row in rated if row["turn"] == 1]),
        "turn_2": average([row["score"] for row in rated if row["turn"] == 2]),
        "categories": {
            category: {
                "score": average(by_category[category]),
                **{f"turn_{turn}": average(by_category_turn[category][turn]) for turn in (1, 2)},
            }
            for category in sorted(by_category)
        },
        "judged": len(mine),
        "unparsable": sum(1 for row in mine if row["score"] == -1 and "error" not in row),
        "refused": sum(1 for row in mine if "error" in row),
    }


def pairwise_rates(rows: list[dict[str, Any]], model: str, baseline: str) -> dict[str, Any]:
    """Win, tie and loss counts and rates of ``model`` against ``baseline`` (FastChat's ``show_result.py`` rule)."""
    games = [row for row in rows if {row["model_1"], row["model_2"]} == {model, baseline}]
    valid = [row for row in games if "error" not in (row["g1_winner"], row["g2_winner"])]
    counts = {"win": 0, "tie": 0, "loss": 0}
    for row in valid:
        if row["g1_winner"] == "tie" or row["g1_winner"] != row["g2_winner"]:
            counts["tie"] += 1
        else:
            winner = row[row["g1_winner"]]  # "model_1" / "model_2" -> that model's name
            counts["win" if winner == model else "loss"] += 1
    total = sum(counts.values())
    rates = {
        "win_rate": counts["win"] / total if total else None,
        "loss_rate": counts["loss"] / total if total else None,
        "win_rate_adjusted": (counts["win"] + 0.5 * counts["tie"]) / total if total else None,
    }
    judged = {"judged": len(games), "no_verdict": len(games) - total}
    return {"model": model, "baseline": baseline, **counts, **rates, **judged}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def results_markdown(judge: str, single: dict[str, Any] | None, pairwise: dict[str, Any] | None) -> str:
    """The tables a FastChat user reads (``show_result.py``'s turn means, win/tie/loss), by category too."""
    lines = [f"# MT-Bench, judged by {judge}", ""]
    if single:
        lines += ["## Single-answer grading (1-10)", "", "| model | turn 1 | turn 2 | average | judged | unparsable |"]
        lines += ["|---|---|---|---|---|---|"]
        lines.append(
            f"| {single['model']} | {_cell(single['turn_1'])} | {_cell(single['turn_2'])} | {_cell(single['score'])} "
            f"| {single['judged']} | {single['unparsable'] + single['refused']} |"
        )
        lines += ["", "| category | turn 1 | turn 2 | average |", "|---|---|---|---|"]
        for category, scores in single["categories"].items():
            lines.append(
                f"| {category} | {_cell(scores['turn_1'])} | {_cell(scores['turn_2'])} | {_cell(scores['score'])} |"
            )
        lines.append("")
    if pairwise:
        lines += [f"## Pairwise against {pairwise['baseline']} (both orders judged)", ""]
        lines += ["| model | win | tie | loss | win rate | loss rate | adjusted win rate | no verdict |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        lines.append(
            f"| {pairwise['model']} | {pairwise['win']} | {pairwise['tie']} | {pairwise['loss']} "
            f"| {_cell(pairwise['win_rate'])} | {_cell(pairwise['loss_rate'])} "
            f"| {_cell(pairwise['win_rate_adjusted'])} | {pairwise['no_verdict']} |"
        )
        lines.append("")
    return "\n".join(lines)


def plot_categories(single: dict[str, Any], path: Path) -> Path:
    """A bar per category (turn 1 and turn 2 side by side), the picture FastChat's radar chart gives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(single["categories"])
    figure, axes = plt.subplots(figsize=(8, 3.5))
    for offset, turn in ((-0.2, 1), (0.2, 2)):
        values = [single["categories"][c][f"turn_{turn}"] or 0.0 for c in categories]
        axes.bar([i + offset for i in range(len(categories))], values, width=0.4, label=f"turn {turn}")
    axes.set_xticks(range(len(categories)), categories, rotation=30)
    axes.set_ylim(0, 10)
    axes.set_ylabel("rating (1-10)")
    axes.set_title(f"MT-Bench per category: {single['model']}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
