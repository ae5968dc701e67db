"""The quality benchmarks' orchestrator (benches/quality/): each method's learning rate chosen on a validation
split by a sweep, then every method at its best lr over several seeds on the test split, with tables (Markdown)
and pictures. A script describes itself as a :class:`Bench` (its worker, its scores) and calls :func:`orchestrate`.

Each run is a fresh process (``SCRIPT --worker JSON``) writing ``<out>/runs/<key>.json``, resumable
(``benchlib.runs``). The sweep writes ``<out>/sweep.json`` (best lr per method), which the final phase reads. A
sweep run may save its collapsed adapter, so the final phase scores the sweep seed's run at the best lr on the
test split without training it again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.data import add_gsm8k_dir
from benchlib.report import fmt, machine_line, markdown_table, mean_std, versus
from benchlib.runs import finite, run_parallel, run_stored, sweep_lrs

METHODS = ["lora", "lora_over_static", "lora_over_dynamic", "cla", "c3la", "glora"]
DEFAULT_METHODS = ["lora", "lora_over_static", "lora_over_dynamic"]


@dataclass
class Metric:
    """A score in a result JSON: its key, its label, and whether higher is better."""

    key: str
    label: str
    higher_better: bool
    digits: int = 4
    items: str | None = None  # a proportion (accuracy, exact match): the spec key of how many items it is over


@dataclass
class Bench:
    """What the generic orchestrator needs to know about one benchmark script."""

    script: Path
    title: str
    selection: Metric  # on the validation split, picks the learning rate
    finals: list[Metric]  # on the test split
    spec: Callable[[argparse.Namespace, str, float, int, int, str], dict]  # (args, method, lr, seed, steps, split)
    tiebreak: Metric | None = None  # on the validation split, between equal selection scores
    can_reuse: Callable[[str], bool] = lambda method: method != "glora"
    extra_final_columns: list[tuple[str, Callable[[list[dict]], str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run_key(spec: dict) -> str:
    """File name (without ``.json``) of a run."""
    return f"{spec['split']}-{spec['method']}-lr{spec['lr']:g}-s{spec['seed']}-n{spec['steps']}"


def run_arm(bench: Bench, spec: dict, out: Path, log: Callable[[str], None]) -> dict:
    """One (method, lr, seed, steps, split) run in a fresh process, or its stored result (resumable)."""
    return run_stored(
        [sys.executable, str(bench.script), "--worker"],
        spec,
        out / "runs" / f"{run_key(spec)}.json",
        log,
        lambda result: ", ".join(f"{k}={fmt(v)}" for k, v in result["scores"].items()),
        note=" (scoring the sweep run)" if spec.get("reuse") else "",
    )


def run_arms(bench: Bench, specs: list[dict], out: Path, log: Callable[[str], None], jobs: int) -> list[dict]:
    """``run_arm`` for every spec, ``jobs`` worker processes at a time; results in the order of ``specs``."""
    return run_parallel(lambda spec: run_arm(bench, spec, out, log), specs, jobs)


def best_lr(results: dict[float, dict], metric: Metric, tiebreak: Metric | None = None) -> float | None:
    """The learning rate with the best validation score among runs that did not fail (ties: ``tiebreak``)."""

    def key(lr: float) -> tuple[float, float]:
        scores = results[lr]["scores"]
        first = scores[metric.key] if metric.higher_better else -scores[metric.key]
        second = 0.0 if tiebreak is None else scores[tiebreak.key] * (1 if tiebreak.higher_better else -1)
        return first, second

    scored = [lr for lr, r in results.items() if "error" not in r and finite(r["scores"].get(metric.key))]
    return max(scored, key=key) if scored else None


def sweep(bench: Bench, args: argparse.Namespace, out: Path, log: Callable[[str], None]) -> dict:
    """Every method x lr on the validation split at the sweep seed; writes ``sweep.json``.

    A method whose best lr is at an edge of its grid gets the next lr beyond that edge, up to ``--extend-edges``
    times (``benchlib.runs.sweep_lrs``).
    """

    def run(todo: list[tuple[str, float]]) -> list[dict]:
        specs = [
            {**bench.spec(args, m, lr, args.sweep_seed, args.steps, "validation"), "save_adapter": bench.can_reuse(m)}
            for m, lr in todo
        ]
        return run_arms(bench, specs, out, log, args.jobs)

    def chosen_lr(results: dict[float, dict]) -> float | None:
        return best_lr(results, bench.selection, bench.tiebreak)

    table = sweep_lrs(args.methods, args.lrs, args.extend_edges, run, chosen_lr, log)
    union = sorted({lr for results in table.values() for lr in results})
    summary = {"steps": args.steps, "seed": args.sweep_seed, "lrs": union, "metric": bench.selection.key}
    summary["methods"] = {}
    for method, results in table.items():
        best = best_lr(results, bench.selection, bench.tiebreak)
        tried = sorted(results)
        summary["methods"][method] = {
            "best_lr": best,
            "edge": best is not None and len(tried) > 1 and best in (tried[0], tried[-1]),
            "scores": {
                f"{lr:g}": (r["error"] if "error" in r else r["scores"][bench.selection.key])
                for lr, r in sorted(results.items())
            },
        }
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    return {"summary": summary, "table": table}


def final(
    bench: Bench, args: argparse.Namespace, out: Path, steps: int, log: Callable[[str], None]
) -> dict[str, list[dict]]:
    """Each method at its best lr from ``sweep.json``, every seed, scored on the test split."""
    path = out / "sweep.json"
    if not path.is_file():
        raise SystemExit(f"{path} missing: run --phase sweep first (same --out)")
    chosen = json.loads(path.read_text())
    specs: list[tuple[str, dict]] = []
    for method in args.methods:
        entry = chosen["methods"].get(method)
        if entry is None or entry["best_lr"] is None:
            log(f"{method}: no best lr in {path} (not swept, or every sweep run failed); skipped")
            continue
        lr = entry["best_lr"]
        for seed in args.seeds:
            spec = bench.spec(args, method, lr, seed, steps, "test")
            sweep_spec = bench.spec(args, method, lr, seed, chosen["steps"], "validation")
            sweep_run = out / "runs" / f"{run_key(sweep_spec)}.json"
            adapter = sweep_run.with_suffix("")
            if (
                seed == chosen["seed"]
                and steps == chosen["steps"]
                and bench.can_reuse(method)
                and (adapter / "adapter_config.json").is_file()
            ):
                spec["reuse"] = str(sweep_run)
            specs.append((method, spec))
    results: dict[str, list[dict]] = {}
    for (method, _), result in zip(specs, run_arms(bench, [s for _, s in specs], out, log, args.jobs), strict=True):
        results.setdefault(method, []).append(result)
    return results


def sweep_table(bench: Bench, summary: dict, lrs: list[float]) -> str:
    """method x lr validation scores, the best marked with ``*``."""
    header = ["method", *(f"lr {lr:g}" for lr in lrs), "best lr"]
    rows = []
    for method, entry in summary["methods"].items():
        cells = [method]
        for lr in lrs:
            value = entry["scores"].get(f"{lr:g}")
            if value is None:
                cells.append("-")  # not tried: another method's edge extension
            elif isinstance(value, str):
                cells.append("failed")
            else:
                mark = "*" if entry["best_lr"] == lr else ""
                cells.append(fmt(value, bench.selection.digits) + mark)
        cells.append(
            "-" if entry["best_lr"] is None else f"{entry['best_lr']:g}" + (" (edge!)" if entry["edge"] else "")
        )
        rows.append(cells)
    return markdown_table(header, rows)


def final_table(bench: Bench, results: dict[str, list[dict]], reference: str = "lora") -> str:
    """method, best lr, each test metric mean +- std and its difference against ``reference``, seeds."""
    header = ["method", "lr"]
    for metric in bench.finals:
        header += [f"{metric.label} mean ± std", f"Δ vs {reference}", "verdict"]
    header += [label for label, _ in bench.extra_final_columns] + ["seeds"]
    ref_runs = [r for r in results.get(reference, []) if "error" not in r]
    rows = []
    for method, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        cells = [method, f"{runs[0]['spec']['lr']:g}" if runs else "-"]
        for metric in bench.finals:
            values = [r["scores"][metric.key] for r in ok]
            mean, std = mean_std(values)
            cells.append(f"{fmt(mean, metric.digits)} ± {fmt(std, metric.digits)}" if values else "-")
            if method == reference or not ref_runs:
                cells += ["-", "-"]
            else:
                items = ok[0]["spec"][metric.items] if metric.items and ok else None
                diff, verdict = versus(values, [r["scores"][metric.key] for r in ref_runs], items)
                cells += [f"{diff:+.{metric.digits}f}" if values else "-", verdict]
        cells += [make(ok) for _, make in bench.extra_final_columns]
        failed = len(runs) - len(ok)
        cells.append(
            f"{len(ok)}"
            + (f" ({failed} failed: {runs[[('error' in r) for r in runs].index(True)]['error']})" if failed else "")
        )
        rows.append(cells)
    return markdown_table(header, rows)


def plot(bench: Bench, out: Path, sweep_result: dict | None, finals: dict[int, dict[str, list[dict]]]) -> list[Path]:
    """PNGs: validation score against lr, training loss at the best lr, the final comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if sweep_result is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, results in sweep_result["table"].items():
            points = sorted((lr, r["scores"][bench.selection.key]) for lr, r in results.items() if "error" not in r)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"validation {bench.selection.label}")
        ax.set_title(f"{bench.title}\nsweep, {sweep_result['summary']['steps']} steps", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "sweep.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    for steps, results in finals.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for method, runs in results.items():
            curves = [dict(r["curve"]) for r in runs if "error" not in r and r.get("curve")]
            if not curves:
                continue
            common = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [statistics.fmean(c[s] for c in curves) for s in common]
            window = max(1, len(common) // 20)
            smooth = [statistics.fmean(mean[max(0, i - window + 1) : i + 1]) for i in range(len(mean))]
            (line,) = ax.plot(common, smooth, label=f"{method} (lr {runs[0]['spec']['lr']:g})")
            ax.fill_between(
                common,
                [min(c[s] for c in curves) for s in common],
                [max(c[s] for c in curves) for s in common],
                color=line.get_color(),
                alpha=0.12,
            )
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (seed mean, smoothed)")
        ax.set_title(
            f"{bench.title}\ntraining loss at each method's best lr, {steps} steps (band: seed min-max)", fontsize=9
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / f"loss_curves_{steps}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, axes = plt.subplots(1, len(bench.finals), figsize=(4.5 * len(bench.finals), 4), squeeze=False)
        methods = list(results)
        for ax, metric in zip(axes[0], bench.finals, strict=True):
            stats = [mean_std([r["scores"][metric.key] for r in results[m] if "error" not in r]) for m in methods]
            ax.bar(range(len(methods)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4, color="C0")
            for i, method in enumerate(methods):
                values = [r["scores"][metric.key] for r in results[method] if "error" not in r]
                ax.scatter([i] * len(values), values, color="k", s=10, zorder=3)
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"test {metric.label} ({'higher' if metric.higher_better else 'lower'} is better)")
            finite = [s[0] for s in stats if math.isfinite(s[0])]
            if finite and not metric.higher_better:  # NLLs differ in the 2nd decimal: do not start at 0
                spread = max(max(finite) - min(finite), 1e-3)
                ax.set_ylim(min(finite) - 2 * spread, max(finite) + 2 * spread)
        fig.suptitle(f"{bench.title}: {steps} steps, mean ± std over seeds (dots: seeds)")
        fig.tight_layout()
        written.append(out / f"final_{steps}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def orchestrate(bench: Bench, args: argparse.Namespace) -> None:
    """Run the phases asked for, then plot and print the tables last."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    lock = threading.Lock()  # --jobs: whole lines from concurrent runs

    def log(message: str) -> None:
        with lock:
            print(message, file=sys.stderr, flush=True)

    began = time.time()
    sweep_result = sweep(bench, args, out, log) if args.phase in ("sweep", "all") else None
    finals: dict[int, dict[str, list[dict]]] = {}
    if args.phase in ("final", "all"):
        finals[args.steps] = final(bench, args, out, args.steps, log)
        if args.longer_steps:
            finals[args.longer_steps] = final(bench, args, out, args.longer_steps, log)
    pictures = plot(bench, out, sweep_result, finals)
    print(f"\n# {bench.title}\n")
    print(f"command: python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")
    print(machine_line())
    print(f"wall time {time.time() - began:.0f} s; results in {out}/runs; pictures: {', '.join(map(str, pictures))}")
    for note in bench.notes:
        print(note)
    summary = sweep_result["summary"] if sweep_result is not None else None
    if summary is None and (out / "sweep.json").is_file():  # --phase final: the sweep it read
        summary = json.loads((out / "sweep.json").read_text())
    if summary is not None:
        print(
            f"\n## Sweep: validation {bench.selection.label} "
            f"({'higher' if bench.selection.higher_better else 'lower'} is better; * best), "
            f"{summary['steps']} steps, seed {summary['seed']}\n"
        )
        print(sweep_table(bench, summary, summary["lrs"]))
        for method, entry in summary["methods"].items():
            if entry["edge"]:
                print(
                    f"\nWARNING: {method}'s best lr {entry['best_lr']:g} is at an edge of the grid "
                    f"{list(entry['scores'])} it was tried on: extend --lrs (or --extend-edges) beyond it"
                )
    for steps, results in finals.items():
        print(f"\n## Final: test split, each method at its best lr, {steps} steps, seeds {args.seeds}\n")
        print(final_table(bench, results))


def arm_spec(args: argparse.Namespace, method: str, lr: float, seed: int, steps: int, split: str) -> dict:
    """The worker settings every quality benchmark shares, for one arm."""
    return {
        "model_dir": args.model_dir,
        "method": method,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "split": split,
        "batch": args.batch,
        "rank": args.rank,
        "max_length": args.max_length,
        "n_val": args.n_val,
        "n_test": args.n_test,
        "eval_batch": args.eval_batch,
        "glora": glora_settings(args) if method == "glora" else {},
        "threads": args.threads,
        "gsm8k_dir": str(Path(args.gsm8k_dir).resolve()),
    }


def glora_settings(args: argparse.Namespace) -> dict:
    """A small GLoRA search for CPU: population P, G generations, P/2 parents, P/2 mutations and crossovers."""
    population, generations = args.glora_search
    half = max(1, population // 2)
    return {
        "ranks": args.glora_ranks,
        "population": population,
        "generations": generations,
        "top_k": half,
        "mutation_count": half,
        "crossover_count": half,
        "search_batches": args.glora_batches,
    }


def mean_of(key: str, digits: int = 0) -> Callable[[list[dict]], str]:
    """A table column: the mean of ``run['train'][key]`` over a method's runs."""

    def make(runs: list[dict]) -> str:
        values = [r["train"][key] for r in runs if r.get("train", {}).get(key) is not None]
        return f"{statistics.fmean(values):,.{digits}f}" if values else "-"

    return make


def common_parser(description: str) -> argparse.ArgumentParser:
    """Flags shared by the quality benchmarks."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["sweep", "final", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 methods, 2 lrs, 1 seed, a few steps")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: " + " ".join(DEFAULT_METHODS))
    parser.add_argument("--lrs", type=float, nargs="+", help="the sweep's grid (every method)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="final phase seeds")
    parser.add_argument("--sweep-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="optimizer steps of the sweep and the final comparison")
    parser.add_argument("--longer-steps", type=int, help="final phase again at this many steps (same best lr)")
    parser.add_argument("--batch", type=int, help="training rows per step")
    parser.add_argument("--rank", type=int, help="LoRA r (the collapsed adapter's rank for every method)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--extend-edges", type=int, help="times a method's grid may grow past an edge holding its best (default 2)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each a process of --threads threads)")
    parser.add_argument("--out", help="results folder (resumable)")
    parser.add_argument(
        "--glora-search", type=int, nargs=2, metavar=("POPULATION", "GENERATIONS"), help="GLoRA's search, small for CPU"
    )
    parser.add_argument("--glora-batches", type=int, help="validation batches scored per GLoRA candidate")
    add_gsm8k_dir(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def apply_defaults(args: argparse.Namespace, defaults: dict) -> None:
    """Fill the flags left unset from ``defaults`` (--quick's ``seeds`` too, unless ``--seeds`` was given)."""
    for key, value in defaults.items():
        if getattr(args, key, None) is None or (key == "seeds" and args.quick and "--seeds" not in sys.argv):
            setattr(args, key, value)
