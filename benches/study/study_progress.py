"""Early progress and the wide-rank fold, from the study's stored runs (``benches/study/study_report.py`` calls these).

Time-to-target: the steps a run needs until its validation loss first reaches a fixed target, read off the
evaluations (step 0, every ``fine_eval_every`` steps up to ``fine_eval_until``, then every epoch). Two targets, the
same for every arm: LoRA's best (at LoRA's best lr, or without a sweep at its control lr: the lowest validation loss
every one of its seeds reaches) and a looser one, halfway from the untrained model's loss at step 0 to LoRA's best.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchlib.report import fmt, markdown_table

Arms = dict[str, tuple[float, list[dict]]]  # arm: (lr, its runs over seeds)


def steps_to(result: dict, target: float, loss_key: str) -> int | None:
    """The first evaluated step whose validation loss is at most ``target`` (``None``: never reached)."""
    return next((e["step"] for e in result["evals"] if e[loss_key] <= target), None)


def targets(finals: Arms, loss_key: str) -> dict[str, float] | None:
    """``{"LoRA's best": ..., "halfway": ...}``, or ``None`` without LoRA runs at LoRA's best lr. LoRA's best is the
    highest of its seeds' lowest losses: the lowest loss every LoRA seed reaches (a mean of the seeds' lowest
    would be out of reach for about half of LoRA's own seeds)."""
    lora = finals.get("lora", (None, []))[1]
    if not lora:
        return None
    best = max(min(e[loss_key] for e in r["evals"]) for r in lora)
    start = statistics.fmean(r["evals"][0][loss_key] for r in lora if r["evals"][0]["step"] == 0)
    return {"LoRA's best": best, "halfway": (start + best) / 2}


def target_arms(finals: Arms, controls: dict[float, Arms]) -> Arms:
    """The arms whose LoRA sets the targets: each arm at its best lr, or without a sweep (no LoRA among them) the
    first control group that has LoRA."""
    if finals.get("lora"):
        return finals
    return next((arms for arms in controls.values() if arms.get("lora")), {})


def median_steps(steps: list[int | None]) -> str:
    """The median over seeds, a seed that never reached the target counting as slower than all; ``-`` when half or
    more never reached it."""
    if not steps:
        return "-"
    ordered = sorted(steps, key=lambda s: float("inf") if s is None else s)
    middle = ordered[(len(ordered) - 1) // 2] if len(ordered) % 2 else None
    if len(ordered) % 2 == 0:
        low, high = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
        middle = None if low is None or high is None else (low + high) / 2
    return "-" if middle is None else f"{middle:g}"


def paired_steps(results: list[dict], reference: list[dict], target: float, loss_key: str) -> str:
    """Steps to ``target`` minus the reference arm's at the same seed, median over the seeds where both reached it
    (``-2 (4)``: 2 steps sooner, 4 seeds); seeds pair the data order and the initialization, so a paired difference
    sees what a median over unequal seed sets can hide."""
    by_seed = {r["spec"]["seed"]: steps_to(r, target, loss_key) for r in reference}
    deltas = []
    for result in results:
        mine, theirs = steps_to(result, target, loss_key), by_seed.get(result["spec"]["seed"])
        if mine is not None and theirs is not None:
            deltas.append(mine - theirs)
    return f"{statistics.median(deltas):+g} ({len(deltas)})" if deltas else "-"


def time_to_target(goal: dict[str, float] | None, finals: Arms, controls: dict[float, Arms], loss_key: str) -> None:
    """Print the time-to-target tables for ``goal`` (from ``targets``): each arm at its best lr, and every arm at
    each control lr."""
    if goal is None:
        return
    shown = ", ".join(f"{name} {value:.4f}" for name, value in goal.items())
    for title, arms in [("each arm at its best lr", finals), *((f"at lr {lr:g}", a) for lr, a in controls.items())]:
        if not arms:
            continue
        rows = []
        reference = arms.get("lora", (None, []))[1]
        for arm, (lr, results) in arms.items():
            cells = [arm, f"{lr:g}", str(len(results))]
            for target in goal.values():
                steps = [steps_to(r, target, loss_key) for r in results]
                reached = sum(s is not None for s in steps)
                paired = "-" if arm == "lora" else paired_steps(results, reference, target, loss_key)
                cells += [median_steps(steps), f"{reached}/{len(steps)}", paired]
            lowest = [min(r["evals"], key=lambda e: e[loss_key]) for r in results]
            cells += [fmt(statistics.fmean(e[loss_key] for e in lowest)), median_steps([e["step"] for e in lowest])]
            rows.append(cells)
        header = ["arm", "lr", "seeds"]
        for name in goal:
            header += [f"steps to {name} (median)", "reached", "vs lora, same seed (median, seeds)"]
        header += [f"lowest validation {loss_key} (mean)", "at step (median)"]
        print(f"\n## Time-to-target, {title}: validation {loss_key} targets {shown}\n")
        print(markdown_table(header, rows))


def seed_mean_curve(results: list[dict], loss_key: str, until: int | None = None) -> list[tuple[int, float]]:
    """``(step, validation loss averaged over seeds)`` at the first run's evaluated steps (up to ``until``), over the
    runs evaluated at those same steps."""
    steps = [e["step"] for e in results[0]["evals"] if until is None or e["step"] <= until]
    same = [r for r in results if [e["step"] for e in r["evals"]][: len(steps)] == steps]
    return [(step, statistics.fmean(r["evals"][i][loss_key] for r in same)) for i, step in enumerate(steps)]


def early_curves(finals: Arms, controls: dict[float, Arms], loss_key: str, until: int) -> None:
    """Print the seed-mean validation loss at each evaluation up to step ``until`` (the numbers behind the lower row
    of curves.png): each arm at its best lr, and every arm at each control lr."""
    for title, arms in [("each arm at its best lr", finals), *((f"at lr {lr:g}", a) for lr, a in controls.items())]:
        curves = {arm: (lr, seed_mean_curve(results, loss_key, until)) for arm, (lr, results) in arms.items()}
        if not curves:
            continue
        steps = [step for step, _ in next(iter(curves.values()))[1]]
        rows = [[arm, f"{lr:g}", *(fmt(loss) for _, loss in curve)] for arm, (lr, curve) in curves.items()]
        print(f"\n## Validation {loss_key} at the early evaluations, {title} (seed mean)\n")
        print(markdown_table(["arm", "lr", *(f"step {step}" for step in steps)], rows))


def fold_table(finals: Arms, controls: dict[float, Arms], args, tests) -> None:
    """The wide-rank arm: its fold error at the end, and its score folded (what it deploys) against unfolded."""
    rows = []
    key, label, _, digits = tests[0]
    for title, arms in [("best lr", finals), *((f"lr {lr:g}", a) for lr, a in controls.items())]:
        lr, results = arms.get("wide_svd", (None, []))
        if not results:
            continue
        val_key = "val_nll" if args.task == "gsm8k" else "val_acc"
        rows.append(
            [title, f"{lr:g}", str(len(results)),
             fmt(statistics.fmean(r["last"]["fold_error_mean"] for r in results)),
             fmt(max(r["last"]["fold_error_max"] for r in results)),
             fmt(statistics.fmean(r["last"][val_key] for r in results), digits),
             fmt(statistics.fmean(r["unfolded_last"][val_key] for r in results), digits),
             fmt(statistics.fmean(r["best"][key] for r in results), digits)]
        )  # fmt: skip
    if rows:
        header = ["wide_svd at", "lr", "seeds", "fold error at the end (mean over modules)", "worst module"]
        header += ["validation score folded (end)", "unfolded (rank 2r, end)", f"{label} at best checkpoint (folded)"]
        print(f"\n## Rank {2 * args.rank} trained, folded to rank {args.rank} by a truncated SVD of B A\n")
        print(markdown_table(header, rows))


def progress_pictures(
    out: Path, goal: dict[str, float] | None, finals: Arms, controls: dict[float, Arms], loss_key: str, args
) -> None:
    """curves.png: seed-mean validation loss against steps, each arm at its best lr and at the first control lr
    (without a sweep: at the first two control lrs), with the two targets; the lower row zooms in on the first
    ``fine_eval_until`` steps (the time-to-target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("each arm at its best lr", finals)] if finals else []
    panels = (panels + [(f"every arm at lr {lr:g}", arms) for lr, arms in controls.items()])[:2]
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 8), squeeze=False)
    for column, (title, arms) in enumerate(panels):
        for row, until in enumerate((None, args.fine_eval_until)):
            ax = axes[row][column]
            for index, (arm, (lr, results)) in enumerate(arms.items()):
                steps, mean = zip(*seed_mean_curve(results, loss_key, until), strict=True)
                style = "-" if index < 10 else "--"  # past the 10 colours of the cycle, which start again
                ax.plot(steps, mean, style, marker=".", label=f"{arm} (lr {lr:g})")
            for (name, value), style in zip((goal or {}).items(), ("--", ":"), strict=False):
                ax.axhline(value, color="grey", linestyle=style, linewidth=1, label=f"target: {name}")
            zoom = "" if until is None else f", first {until} steps"
            ax.set_title(f"{title}{zoom}: seed mean", fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(f"validation {loss_key}")
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{args.task}: {args.train_rows} training rows, {args.epochs} epochs", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
