"""Tables and pictures of the over-parameterization study (``benches/study/study_regime.py``), from its stored runs.

- The regime: each method at its best lr, validation loss at its lowest and at the end (a rise means the run
  overfits), the epoch of the checkpoint chosen on validation, and the test score there and at the end.
- The sweep and learning-rate robustness: each lr's best validation score at seed 0, and which lrs come within a
  tolerance of the method's best (accuracy: 0.01; NLL: 1%).
- Seeds: the test score of the checkpoint best on validation, mean ± std, against LoRA (the benches' verdict).
- Ablations of LoRA-Over's knobs against LoRA-Over static at capacity 1, same seeds, same lr.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchlib.report import fmt, markdown_table, mean_std, versus

ACC_TOLERANCE = 0.01  # PrivacyQA: an lr is "within reach" when its accuracy is at most this below the best
NLL_TOLERANCE = 0.01  # GSM8K: ... when its answer NLL is at most 1% above the best


def load_runs(out: Path) -> dict[str, dict]:
    """Every stored run that did not fail, by file stem."""
    runs = {}
    for path in sorted((out / "runs").glob("*.json")):
        result = json.loads(path.read_text())
        if "error" not in result:
            runs[path.stem] = result
    return runs


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


def report(args, out: Path, ablations, spec_for, run_key, selected: tuple[str, bool]) -> None:
    """Print the Markdown tables and write the pictures."""
    runs = load_runs(out)
    select, higher = selected
    task = "gsm8k" if args.task == "gsm8k" else args.task
    loss_key, _, tests = metrics(task)
    best_lrs = json.loads((out / "best_lrs.json").read_text()) if (out / "best_lrs.json").is_file() else {}

    def find(method: str, lr: float, seed: int, knobs: dict | None = None) -> dict | None:
        return runs.get(run_key(spec_for(args, method, lr, seed, knobs)))

    # ---- sweep and robustness
    sweep: dict[str, dict[float, dict]] = {}
    for result in runs.values():
        spec = result["spec"]
        if spec["seed"] == 0 and not spec["knobs"] and spec["method"] in args.methods:
            sweep.setdefault(spec["method"], {})[spec["lr"]] = result
    lrs = sorted({lr for table in sweep.values() for lr in table})
    rows = []
    reach = {}
    for method in args.methods:
        table = sweep.get(method, {})
        scores = {lr: r["best"][select] for lr, r in table.items()}
        reach[method] = within_reach(scores, higher)
        cells = [method]
        for lr in lrs:
            if lr not in table:
                cells.append("-")
                continue
            mark = "*" if best_lrs.get(method) == lr else ""
            cells.append(f"{fmt(scores[lr], 3 if higher else 4)}{mark} (ep {table[lr]['best']['epoch']:g})")
        inside = reach[method]
        width = f"{inside[-1] / inside[0]:.3g}x ({len(inside)} of {len(scores)})" if scores else "-"
        cells += [", ".join(f"{lr:g}" for lr in reach[method]) or "-", width]
        rows.append(cells)
    tolerance = f"within {ACC_TOLERANCE} of the best" if higher else f"within {NLL_TOLERANCE:.0%} of the best"
    print(f"## Sweep: validation {select} of the best checkpoint (epoch in brackets), seed 0; * chosen lr\n")
    header = ["method", *(f"lr {lr:g}" for lr in lrs), f"lrs {tolerance}", "range (lrs in it of those tried)"]
    print(markdown_table(header, rows))

    # ---- the regime and the seeds: each method at its best lr, and the --controls (method, lr) pairs
    arms = {(m, best_lrs[m]): m for m in args.methods if best_lrs.get(m)}
    arms.update({(m, lr): f"{m} (control)" for m, lr in args.controls})
    finals = {name: [r for s in args.seeds if (r := find(m, lr, s))] for (m, lr), name in arms.items()}
    lr_of = {name: lr for (_, lr), name in arms.items()}
    rows = []
    for name, results in finals.items():
        lowest = [min(e[loss_key] for e in r["evals"]) for r in results]
        last = [r["last"][loss_key] for r in results]
        rise = [b - a for a, b in zip(lowest, last, strict=True)]
        rows.append(
            [name, f"{lr_of[name]:g}", str(len(results)),
             f"{statistics.fmean(r['best']['epoch'] for r in results):.1f} of {args.epochs}",
             f"{fmt(mean_std(lowest)[0])}", f"{fmt(mean_std(last)[0])}",
             f"{fmt(mean_std(rise)[0])} ({sum(x > 0 for x in rise)}/{len(rise)} rose)"]
        )  # fmt: skip
    print(f"\n## The regime: validation {loss_key} per run (means over seeds)\n")
    print(markdown_table(["method", "lr", "seeds", "best epoch", "lowest", "last", "rise"], rows))
    print(f"\n## Seeds {args.seeds}: test split, each method at its best lr (and the controls)\n")
    print(seeds_table(finals, lr_of, "lora", tests, args.n_test))
    for method, lr in args.controls:  # every method at the control's lr, against the control
        same = {n: runs for n, runs in finals.items() if lr_of[n] == lr}
        if len(same) > 1:
            print(f"\n## At one learning rate, {lr:g}: against {method} (control)\n")
            print(seeds_table(same, lr_of, f"{method} (control)", tests, args.n_test))

    # ---- ablations
    ablation_rows = []
    lr = best_lrs.get("lora_over_static")
    base = [find("lora_over_static", lr, s) for s in args.ablation_seeds] if lr else []
    key, label, is_higher, digits = tests[0]
    for name, method, knobs in ablations if lr else []:
        results = [r for s in args.ablation_seeds if (r := find(method, lr, s, knobs))]
        if not results:
            continue
        values = [r["best"][key] for r in results]
        pairs = [(r["best"][key], b["best"][key]) for r, b in zip(results, base, strict=False) if b]
        diff, verdict = versus([a for a, _ in pairs], [b for _, b in pairs], args.n_test if is_higher else None)
        trainable = [r["train"].get("trainable_at_begin") for r in results]
        ablation_rows.append(
            [name, str(len(results)), f"{fmt(mean_std(values)[0], digits)} ± {fmt(mean_std(values)[1], digits)}",
             "-" if name.endswith("(base)") else fmt(diff, digits), "-" if name.endswith("(base)") else verdict,
             f"{statistics.fmean(t for t in trainable if t):,.0f}" if any(trainable) else "-"]
        )  # fmt: skip
    if len(ablation_rows) > 1:  # more than the base
        print(f"\n## Ablations: LoRA-Over at lr {lr:g} (static's best), seeds {args.ablation_seeds}\n")
        header = ["variant", "seeds", label, "Δ vs base", "verdict", "trainable at begin"]
        print(markdown_table(header, ablation_rows))
    pictures(args, out, sweep, finals, lr_of, reach, loss_key, select, higher, ablation_rows, label)


def seeds_table(finals: dict[str, list[dict]], lr_of: dict, reference: str, tests, n_test: int) -> str:
    """Test scores at the best checkpoint (with the verdict against ``reference``) and at the end."""
    header = ["method", "lr", "seeds"]
    for _, label, _, _ in tests:
        header += [f"{label} at best checkpoint", f"Δ vs {reference}", "verdict", f"{label} at the end", "Δ"]
    rows = []
    ref_runs = finals.get(reference, [])
    for name, results in finals.items():
        cells = [name, f"{lr_of[name]:g}", str(len(results))]
        for key, _, is_higher, digits in tests:
            for where, with_verdict in (("best", True), ("last", False)):
                values = [r[where][key] for r in results]
                cells.append(f"{fmt(mean_std(values)[0], digits)} ± {fmt(mean_std(values)[1], digits)}")
                if name == reference:
                    cells += ["-", "-"] if with_verdict else ["-"]
                    continue
                diff, verdict = versus(values, [r[where][key] for r in ref_runs], n_test if is_higher else None)
                cells += [fmt(diff, digits), verdict] if with_verdict else [fmt(diff, digits)]
        rows.append(cells)
    return markdown_table(header, rows)


def pictures(args, out, sweep, finals, lr_of, reach, loss_key, select, higher, ablation_rows, label) -> None:
    """curves.png (the regime), sweep.png (robustness), ablations.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for lr, result in sorted(sweep.get("lora", {}).items()):
        evals = result["evals"]
        axes[0].plot([e["epoch"] for e in evals], [e[loss_key] for e in evals], marker="o", label=f"lr {lr:g}")
    axes[0].set_title(f"LoRA, seed 0: validation {loss_key} per epoch", fontsize=9)
    for method, results in finals.items():
        epochs = [e["epoch"] for e in results[0]["evals"]]
        curves = [[e[loss_key] for e in r["evals"]] for r in results if len(r["evals"]) == len(epochs)]
        mean = [statistics.fmean(c[i] for c in curves) for i in range(len(epochs))]
        (line,) = axes[1].plot(epochs, mean, marker="o", label=f"{method} (lr {lr_of[method]:g})")
        axes[1].fill_between(
            epochs, [min(c[i] for c in curves) for i in range(len(epochs))],
            [max(c[i] for c in curves) for i in range(len(epochs))], color=line.get_color(), alpha=0.15,
        )  # fmt: skip
    axes[1].set_title(f"each method at its best lr: seed mean (band: min-max over {len(args.seeds)} seeds)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {loss_key}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{args.task}: {args.train_rows} training rows, {args.epochs} epochs", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, table in sweep.items():
        points = sorted((lr, r["best"][select]) for lr, r in table.items())
        (line,) = ax.plot(*zip(*points, strict=True), marker="o", label=method)
        if reach.get(method):
            ax.hlines(min(s for lr, s in points if lr in reach[method]), reach[method][0], reach[method][-1],
                      color=line.get_color(), linewidth=6, alpha=0.25)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation {select} (best checkpoint)")
    ax.set_title("sweep, seed 0 (bars: lrs within tolerance of each method's best)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)

    if len(ablation_rows) > 1:
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
