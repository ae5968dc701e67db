"""Tables and pictures of the over-parameterization study (``benches/study/study_regime.py``), from its stored runs.

- The sweep: each arm's validation score at its best checkpoint per lr, mean ± 95% CI over the sweep seeds, and
  the lrs within a tolerance of the arm's best (accuracy: 0.01; NLL: 1%).
- The regime: each arm at its best lr (without a sweep: at its control lr), validation loss at its lowest and at
  the end (a rise means it overfits).
- Seeds: the test score of the checkpoint best on validation, mean ± 95% CI, against LoRA (difference with its
  95% CI, and the benches' verdict), each arm at its best lr and every arm at each ``--controls`` lr.
- Time-to-target and the wide-rank fold (``benches/study/study_progress.py``).
- Ablations of LoRA-Over's knobs against LoRA-Over static at capacity 1, same seeds, same lr.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from benchlib.report import ci95, fmt, markdown_table, mean_std, verdict95, versus
from study_progress import early_curves, fold_table, progress_pictures, target_arms, targets, time_to_target

ACC_TOLERANCE = 0.01  # PrivacyQA: an lr is "within reach" when its accuracy is at most this below the best
NLL_TOLERANCE = 0.01  # GSM8K: ... when its answer NLL is at most 1% above the best


def load_runs(out: Path) -> tuple[dict[str, dict], set[str]]:
    """Every stored run that did not fail, by file stem; and the stems of the failed ones."""
    runs, failed = {}, set()
    for path in sorted((out / "runs").glob("*.json")):
        result = json.loads(path.read_text())
        if "error" in result:
            failed.add(path.stem)
        else:
            runs[path.stem] = result
    return runs, failed


def stored(out: Path, name: str) -> dict:
    """A JSON file the sweep writes (``best_lrs.json``, ``sweep_grids.json``), or ``{}``."""
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else {}


def metrics(task: str) -> tuple[str, str, list[tuple[str, str, bool, int]]]:
    """(validation loss key, validation selection key, test metrics as (key, label, higher better, digits))."""
    if task == "gsm8k":
        return "val_nll", "val_nll", [("test_nll", "test answer NLL", False, 4)]
    return (
        "val_loss",
        "val_acc",
        [("test_acc", "test accuracy", True, 3), ("test_loss", "test cross-entropy", False, 4)],
    )


def within_reach(scores: dict[float, float], higher: bool) -> list[float]:
    """The lrs whose score is within the tolerance of the best one."""
    if not scores:
        return []
    best = (max if higher else min)(scores.values())
    if higher:
        return sorted(lr for lr, s in scores.items() if s >= best - ACC_TOLERANCE)
    return sorted(lr for lr, s in scores.items() if s <= best * (1 + NLL_TOLERANCE))


def interval(values: list[float], digits: int) -> str:
    """``mean ± 95% CI half-width`` (``mean`` alone for one value)."""
    mean, half = statistics.fmean(values), ci95(values)
    return fmt(mean, digits) if len(values) < 2 else f"{fmt(mean, digits)} ± {fmt(half, digits)}"


def report(args, out: Path, ablations, spec_for, run_key, selected: tuple[str, bool]) -> None:
    """Print the Markdown tables and write the pictures."""
    runs, failed = load_runs(out)
    select, higher = selected
    loss_key, _, tests = metrics(args.task)
    best_lrs, grids = stored(out, "best_lrs.json"), stored(out, "sweep_grids.json")

    def find(arm: str, lr: float, seeds: list[int], knobs: dict | None = None) -> list[dict]:
        return [r for s in seeds if (r := runs.get(run_key(spec_for(args, arm, lr, s, knobs))))]

    def failures(arm: str, lr: float) -> int:
        return sum(run_key(spec_for(args, arm, lr, s)) in failed for s in args.sweep_seeds)

    # ---- sweep and robustness: every arm x lr of its sweep grid (as the sweep ran it) at the sweep seeds
    sweep = {arm: {lr: find(arm, lr, args.sweep_seeds) for lr in grids.get(arm, [])} for arm in args.arms}
    sweep = {arm: {lr: found for lr, found in table.items() if found} for arm, table in sweep.items()}
    sweep = {arm: table for arm, table in sweep.items() if table}
    lrs = sorted({lr for table in sweep.values() for lr in table})
    digits = 3 if higher else 4
    rows, reach = [], {}
    for arm, table in sweep.items():
        scores = {lr: statistics.fmean(r["best"][select] for r in found) for lr, found in table.items()}
        reach[arm] = within_reach(scores, higher)
        cells = [arm]
        for lr in lrs:
            found = table.get(lr)
            mark = "*" if best_lrs.get(arm) == lr else ""
            broken = failures(arm, lr)
            score = interval([r["best"][select] for r in found], digits) if found else None
            cells.append(f"{score}{mark} ({len(found)}{f', {broken} failed' if broken else ''})" if found else "-")
        inside = reach[arm]
        width = f"{inside[-1] / inside[0]:.3g}x ({len(inside)} of {len(scores)})"
        cells += [", ".join(f"{lr:g}" for lr in inside), width]
        rows.append(cells)
    tolerance = f"within {ACC_TOLERANCE} of the best" if higher else f"within {NLL_TOLERANCE:.0%} of the best"
    if rows:
        print(f"## Sweep: validation {select} of the best checkpoint, mean ± 95% CI (seeds), seeds {args.sweep_seeds}")
        print()
        header = ["arm", *(f"lr {lr:g}" for lr in lrs), f"lrs {tolerance}", "range (lrs in it of those tried)"]
        print(markdown_table(header, rows))

    # ---- each arm at its best lr, and every arm at each control lr
    finals = {}
    for arm in args.arms:
        if best_lrs.get(arm) and (found := find(arm, best_lrs[arm], args.seeds)):
            finals[arm] = (best_lrs[arm], found)
    controls = control_arms(args, find)
    # without a sweep (controls only), the regime is read at the control lrs: each arm and lr once
    seen = {(arm, lr): found for arms in controls.values() for arm, (lr, found) in arms.items()}
    regime = list(finals.items()) or [(arm, (lr, found)) for (arm, lr), found in seen.items()]
    rows = []
    for arm, (lr, results) in regime:
        lowest = [min(e[loss_key] for e in r["evals"]) for r in results]
        last = [r["last"][loss_key] for r in results]
        rise = [b - a for a, b in zip(lowest, last, strict=True)]
        rows.append(
            [arm, f"{lr:g}", str(len(results)),
             f"{statistics.fmean(r['best']['epoch'] for r in results):.1f} of {args.epochs}",
             fmt(statistics.fmean(lowest)), fmt(statistics.fmean(last)),
             f"{fmt(statistics.fmean(rise))} ({sum(x > 0 for x in rise)}/{len(rise)} rose)"]
        )  # fmt: skip
    print(f"\n## The regime: validation {loss_key} per run (means over seeds)\n")
    print(markdown_table(["arm", "lr", "seeds", "best epoch", "lowest", "last", "rise"], rows))
    if finals:
        fresh = [s for s in args.seeds if s not in args.sweep_seeds]  # seeds that took no part in choosing the lr
        chose = f"the lr chosen on validation at seeds {args.sweep_seeds}" + (f"; seeds {fresh} fresh" if fresh else "")
        print(f"\n## Seeds {args.seeds}: test split, each arm at its best lr ({chose})\n")
        print(seeds_table(finals, "lora", tests, args.n_test))
    for lr, same in controls.items():
        reference = "lora" if "lora" in same else next(iter(same))
        elsewhere = f" at lr {same[reference][0]:g}" if same[reference][0] != lr else ""
        print(f"\n## At one learning rate, {lr:g}: against {reference}{elsewhere}\n")
        print(seeds_table(same, reference, tests, args.n_test))

    goal = targets(target_arms(finals, controls), loss_key)  # the same two targets for every arm and picture
    time_to_target(goal, finals, controls, loss_key)
    early_curves(finals, controls, loss_key, args.fine_eval_until)
    fold_table(finals, controls, args, tests)
    collapse = [abs(r["collapse_val_diff"]) for r in runs.values() if "collapse_val_diff" in r]
    if collapse:  # the collapsed adapter scored again, against the run's last in-training evaluation
        print(f"\n## Collapse: |validation {select} after collapse - last in-training| at most {max(collapse):.2g}")
        print(f"({len(collapse)} stored runs)")

    # ---- ablations
    ablation_rows = []
    lr = best_lrs.get("lora_over_static")
    base = find("lora_over_static", lr, args.ablation_seeds) if lr else []
    key, label, is_higher, digits = tests[0]
    for name, method, knobs in ablations if lr else []:
        results = find(method, lr, args.ablation_seeds, knobs)
        if not results:
            continue
        values = [r["best"][key] for r in results]
        diff, verdict = versus(values, [b["best"][key] for b in base], args.n_test if is_higher else None)
        trainable = [r["train"].get("trainable_at_begin") for r in results]
        ablation_rows.append(
            [name, str(len(results)), f"{fmt(mean_std(values)[0], digits)} ± {fmt(mean_std(values)[1], digits)}",
             "-" if name.endswith("(base)") else fmt(diff, digits), "-" if name.endswith("(base)") else verdict,
             f"{statistics.fmean(t for t in trainable if t):,.0f}" if any(trainable) else "-"]
        )  # fmt: skip
    if len(ablation_rows) > 1:  # more than the base
        print(f"\n## Ablations: LoRA-Over at lr {lr:g} (static's best), seeds {args.ablation_seeds}\n")
        header = ["variant", "seeds", f"{label} (mean ± std)", "Δ vs base", "verdict", "trainable at begin"]
        print(markdown_table(header, ablation_rows))
    if sweep:
        sweep_picture(out, sweep, reach, select)
    progress_pictures(out, goal, finals, controls, loss_key, args)
    ablation_picture(out, ablation_rows, label)


def control_arms(args, find) -> dict[float, dict[str, tuple[float, list[dict]]]]:
    """Every arm run at each ``--controls`` lr (the ``--arms`` too, where they were run there), in order. A group
    without LoRA at its lr gets LoRA at the lr LoRA is controlled at, so an arm that needs its own rate (LoRA+ at
    a fifth of LoRA's) is still read against LoRA."""
    lora_lr = next((lr for arm, lr in args.controls if arm == "lora"), None)
    lora = find("lora", lora_lr, args.seeds) if lora_lr is not None else []
    controls = {}
    for lr in sorted({lr for _, lr in args.controls}):
        listed = dict.fromkeys([*args.arms, *(arm for arm, _ in args.controls)])  # in order, once each
        same = {arm: (lr, found) for arm in listed if (found := find(arm, lr, args.seeds))}
        if same and "lora" not in same and lora:
            same = {"lora": (lora_lr, lora), **same}
        if same:
            controls[lr] = same
    return controls


def seeds_table(arms: dict[str, tuple[float, list[dict]]], reference: str, tests, n_test: int) -> str:
    """Test scores at the best checkpoint, mean ± 95% CI, with the difference against ``reference`` (± the 95% CI
    of the difference) and the verdict; the score at the end; trainable parameters."""
    header = ["arm", "lr", "seeds"]
    for _, label, _, _ in tests:
        header += [f"{label} at best checkpoint", f"Δ vs {reference} (95% CI)", "verdict", f"{label} at the end"]
    rows = []
    ref_runs = arms.get(reference, (None, []))[1]
    for arm, (lr, results) in arms.items():
        cells = [arm, f"{lr:g}", str(len(results))]
        for key, _, is_higher, digits in tests:
            values = [r["best"][key] for r in results]
            cells.append(interval(values, digits))
            if arm == reference or not ref_runs:
                cells += ["-", "-"]
            else:
                reference_values = [r["best"][key] for r in ref_runs]
                diff, half, verdict = verdict95(values, reference_values, n_test if is_higher else None)
                shown = fmt(diff, digits) if math.isnan(half) else f"{fmt(diff, digits)} ± {fmt(half, digits)}"
                cells += [shown, verdict]
            cells.append(interval([r["last"][key] for r in results], digits))
        rows.append(cells)
    return markdown_table(header, rows)


def sweep_picture(out: Path, sweep: dict, reach: dict, select: str) -> None:
    """sweep.png: each arm's seed-mean validation score per lr (line) and every seed's (dots), and its within-reach
    lrs (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for offset, (arm, table) in enumerate(sweep.items()):
        points = sorted(table.items())
        xs = [lr for lr, _ in points]
        means = [statistics.fmean(r["best"][select] for r in found) for _, found in points]
        (line,) = ax.plot(xs, means, marker="o", label=arm)
        shift = 1 + 0.015 * (offset - len(sweep) / 2)  # seeds of different arms side by side
        for lr, found in points:
            ax.scatter([lr * shift] * len(found), [r["best"][select] for r in found], s=9, color=line.get_color())
        if reach.get(arm):
            ax.hlines(min(m for x, m in zip(xs, means, strict=True) if x in reach[arm]), reach[arm][0], reach[arm][-1],
                      color=line.get_color(), linewidth=6, alpha=0.2)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation {select} (best checkpoint)")
    ax.set_title("sweep: seed mean (line), each seed (dots); bands: lrs within reach of each arm's best", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


def ablation_picture(out: Path, ablation_rows: list[list[str]], label: str) -> None:
    """ablations.png: each ablation's test score (mean ± std over seeds)."""
    if len(ablation_rows) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    means = [float(r[2].split(" ± ")[0]) for r in ablation_rows]
    stds = [float(r[2].split(" ± ")[1]) for r in ablation_rows]
    ax.barh(range(len(means)), means, xerr=stds, capsize=3, color="C0")
    ax.set_yticks(range(len(means)))
    ax.set_yticklabels([r[0] for r in ablation_rows], fontsize=8)
    spread = max(max(means) - min(means), 1e-3)
    ax.set_xlim(min(means) - 2 * spread, max(means) + 2 * spread)
    ax.set_xlabel(f"{label} at the best checkpoint (mean ± std over seeds)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "ablations.png", dpi=110)
    plt.close(fig)
