"""When does over-parameterization help? LoRA against LoRA-Over and its rivals where generalization, not only
optimization speed, decides the score: a fixed, limited training set seen for several epochs, validation after every
epoch (and more often early on, for the time-to-target), the checkpoint best on validation scored on the test split
(``benches/study/study_worker.py`` runs one arm).

    python benches/study/study_regime.py --quick                                   # tiny models, plumbing only
    python benches/study/study_regime.py --task privacy_qa --jobs 2                # sweep, seeds, ablations, report
    python benches/study/study_regime.py --task gsm8k --stage controls --controls lora=0.001 ... --seeds 0 1 2
    python benches/study/study_regime.py --task privacy_qa --stage report          # tables and pictures again

Arms (``--arms``, :data:`ARMS`): LoRA; LoRA-Over static and dynamic, each also with its auxiliary cores at 0.1x and
0.3x the learning rate (``aux_lr``); LoRA+ (PEFT's optimizer) at ratios 16 and 4; rsLoRA; LoRA at twice the rank
folded back by a truncated SVD (``benches/study/study_fold.py``); cLA; c3LA.

Stages:
- ``sweep``: every arm x its lrs (``--lrs``, else the arm's own grid) at ``--sweep-seeds``; an arm whose best lr is
  at an edge gets the next lr of the 1-1.5-2-3-5-7 series (``--lr-series``) beyond it (``--extend-edges`` times).
  The best lr is the one with the best validation score (at the best checkpoint) averaged over the sweep seeds.
- ``seeds``: every arm at its best lr, ``--seeds`` (the sweep's seeds are reused).
- ``controls``: ``--controls ARM=LR ...`` at ``--seeds`` (arms compared at one lr).
- ``ablate``: LoRA-Over's knobs at LoRA-Over static's best lr, ``--ablation-seeds``: capacity 0.25 and 4,
  num_cores 3, aux_lr 3x and 10x, factors A and B, and the schedules at one budget (half the cost of every
  module at capacity 1: static at capacity 0.5, prepass and dynamic at capacity 1 with their default budget).
- ``report``: tables (Markdown) and pictures (``<out>/*.png``) from the stored runs.

Every run is a fresh process with ``--threads`` torch threads, ``--jobs`` at a time, writing
``<out>/runs/<key>.json``; a run whose JSON exists with the same settings is not run again (resumable).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/, where benchlib lives
from benchlib.data import add_gsm8k_dir  # noqa: E402
from benchlib.report import machine_line  # noqa: E402
from benchlib.runs import finite, run_parallel, run_stored, sweep_lrs  # noqa: E402

WORKER = Path(__file__).resolve().with_name("study_worker.py")
LR_SERIES = (1, 1.5, 2, 3, 5, 7)  # mantissas of the lrs an edge extends to (the 1-3 series is too coarse)
FINE_GRID = [1e-3, 1.5e-3, 2e-3, 3e-3]
LOW_GRID = [3e-4, 5e-4, 1e-3]  # arms whose effective step is larger than LoRA's at one lr (LoRA+ with B faster, rsLoRA)
# name: (worker method, knobs, its lrs when --lrs is not given). Knobs: LoraOverConfig fields ("aux_lr_x": a
# multiple of the lr) and the study's own (``loraplus_ratio``).
ARMS: dict[str, tuple[str, dict, list[float]]] = {
    "lora": ("lora", {}, FINE_GRID),
    "lora_over_static": ("lora_over_static", {}, FINE_GRID),
    "lora_over_dynamic": ("lora_over_dynamic", {}, FINE_GRID),
    "static_aux0.1": ("lora_over_static", {"aux_lr_x": 0.1}, FINE_GRID),
    "static_aux0.3": ("lora_over_static", {"aux_lr_x": 0.3}, FINE_GRID),
    "dynamic_aux0.1": ("lora_over_dynamic", {"aux_lr_x": 0.1}, FINE_GRID),
    "dynamic_aux0.3": ("lora_over_dynamic", {"aux_lr_x": 0.3}, FINE_GRID),
    "loraplus16": ("loraplus", {"loraplus_ratio": 16}, LOW_GRID),  # the ratio Hayou et al. recommend (2^4)
    "loraplus4": ("loraplus", {"loraplus_ratio": 4}, LOW_GRID),
    "rslora": ("rslora", {}, LOW_GRID),
    "wide_svd": ("lora_wide", {}, FINE_GRID),
    "cla": ("cla", {}, FINE_GRID),
    "c3la": ("c3la", {}, FINE_GRID),
}
TASKS = {
    # rows seen: train_rows x epochs; the test split is scored only when validation improves, and at the end;
    # validation is also scored every fine_eval_every steps up to fine_eval_until (the first two epochs)
    "privacy_qa": dict(
        train_rows=384, epochs=6, batch=16, rank=8, evals_per_epoch=1, n_val=500, n_test=1000, max_length=128,
        eval_batch=64, fine_eval_every=6, fine_eval_until=48,
    ),
    "gsm8k": dict(
        train_rows=32, epochs=4, batch=4, rank=16, evals_per_epoch=1, n_val=48, n_test=100, max_length=256,
        eval_batch=8, fine_eval_every=4, fine_eval_until=16,
    ),
}  # fmt: skip
QUICK = dict(lrs=[1e-3, 1e-2], train_rows=16, epochs=2, batch=4, rank=4, evals_per_epoch=1, n_val=8, n_test=8,
             max_length=64, eval_batch=8, fine_eval_every=2, fine_eval_until=4)  # fmt: skip
# Ablations of LoRA-Over's knobs: (name, method, LoraOverConfig overrides; "aux_lr_x" is a multiple of the lr).
ABLATIONS = [
    ("capacity 1 (base)", "lora_over_static", {}),
    ("capacity 0.25", "lora_over_static", {"capacity": 0.25}),
    ("capacity 4", "lora_over_static", {"capacity": 4.0}),
    ("num_cores 3", "lora_over_static", {"num_cores": 3}),
    ("aux_lr 3x", "lora_over_static", {"aux_lr_x": 3}),
    ("aux_lr 10x", "lora_over_static", {"aux_lr_x": 10}),
    ("factors A", "lora_over_static", {"factors": "A"}),
    ("factors B", "lora_over_static", {"factors": "B"}),
    ("half budget: static, capacity 0.5", "lora_over_static", {"capacity": 0.5}),
    ("half budget: prepass", "lora_over_prepass", {}),
    ("half budget: dynamic", "lora_over_dynamic", {}),
]


def selection(task: str) -> tuple[str, bool]:
    """The validation score that picks checkpoints and learning rates, and whether higher is better."""
    return ("val_acc", True) if task != "gsm8k" else ("val_nll", False)


def spec_for(args: argparse.Namespace, arm: str, lr: float, seed: int, knobs: dict | None = None) -> dict:
    """One run's worker settings: ``arm`` (a name of :data:`ARMS`, or a worker method for the ablations) with
    ``knobs`` on top of the arm's own."""
    method, arm_knobs, _ = ARMS.get(arm, (arm, {}, []))
    knobs = {**arm_knobs, **(knobs or {})}
    if "aux_lr_x" in knobs:
        knobs["aux_lr"] = knobs.pop("aux_lr_x") * lr
    steps_per_epoch = args.train_rows // args.batch
    task = "quick" if args.quick and args.task == "privacy_qa" else args.task
    return {
        "task": task,
        "model_dir": args.model_dir,
        "method": method,
        "knobs": knobs,
        "lr": lr,
        "seed": seed,
        "train_rows": args.train_rows,
        "epochs": args.epochs,
        "batch": args.batch,
        "steps_per_epoch": steps_per_epoch,
        "steps_per_eval": max(1, steps_per_epoch // args.evals_per_epoch),
        "rank": args.rank,
        "max_length": args.max_length,
        "n_val": args.n_val,
        "n_test": args.n_test,
        "eval_batch": args.eval_batch,
        "fine_eval_every": args.fine_eval_every,
        "fine_eval_until": args.fine_eval_until,
        "threads": args.threads,
        "split": "study",
        "gsm8k_dir": str(Path(args.gsm8k_dir).resolve()),
    }


def run_key(spec: dict) -> str:
    """File name (without ``.json``) of a run: method, knobs, lr, seed."""
    knobs = "".join(f"-{k}{v:g}" for k, v in sorted(spec["knobs"].items()) if isinstance(v, float))
    knobs += "".join(f"-{k}{v}" for k, v in sorted(spec["knobs"].items()) if not isinstance(v, float))
    return f"{spec['method']}{knobs}-lr{spec['lr']:g}-s{spec['seed']}"


def run_arm(spec: dict, out: Path, log) -> dict:
    """One arm in a fresh process, or its stored result."""

    def done(result: dict) -> str:
        return f"best at epoch {result['best']['epoch']}: {result['best']}"

    return run_stored([sys.executable, str(WORKER)], spec, out / "runs" / f"{run_key(spec)}.json", log, done)


def run_all(specs: list[dict], out: Path, log, jobs: int) -> list[dict]:
    """``run_arm`` for every spec, ``jobs`` at a time, results in order."""
    return run_parallel(lambda spec: run_arm(spec, out, log), specs, jobs)


def best_score(results: list[dict], task: str) -> float | None:
    """The runs' validation score at their best checkpoint, averaged over seeds (``None`` if any run failed:
    an lr that fails one seed is not a usable lr)."""
    key, _ = selection(task)
    scores = [r["best"][key] if "error" not in r else None for r in results]
    return sum(scores) / len(scores) if scores and all(finite(s) for s in scores) else None


def best_lr(results: dict[float, list[dict]], task: str) -> float | None:
    """The lr whose runs reached the best seed-mean validation score."""
    _, higher = selection(task)
    scored = {lr: best_score(r, task) for lr, r in results.items()}
    scored = {lr: s for lr, s in scored.items() if finite(s)}
    if not scored:
        return None
    return (max if higher else min)(scored, key=scored.get)


def sweep(args: argparse.Namespace, out: Path, log) -> dict[str, float]:
    """Every arm x lr at the sweep seeds (edges extended); writes and returns ``{arm: best lr}``."""

    def run(todo: list[tuple[str, float]]) -> list[list[dict]]:
        specs = [spec_for(args, arm, lr, seed) for arm, lr in todo for seed in args.sweep_seeds]
        results = iter(run_all(specs, out, log, args.jobs))
        return [[next(results) for _ in args.sweep_seeds] for _ in todo]

    grids = {arm: args.lrs or ARMS[arm][2] for arm in args.arms}
    table = sweep_lrs(
        args.arms, grids, args.extend_edges, run, lambda results: best_lr(results, args.task), log, args.lr_series
    )
    chosen = {arm: best_lr(results, args.task) for arm, results in table.items()}
    for name, value in (("best_lrs.json", chosen), ("sweep_grids.json", {a: sorted(r) for a, r in table.items()})):
        path = out / name
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**earlier, **value}, indent=1))
    return chosen


def stored_best_lrs(out: Path) -> dict[str, float]:
    """The sweep's choice (``best_lrs.json``)."""
    path = out / "best_lrs.json"
    if not path.is_file():
        raise SystemExit(f"{path} missing: run --stage sweep first (same --out)")
    return json.loads(path.read_text())


def control(pair: str) -> tuple[str, float]:
    """``ARM=LR`` of ``--controls``, checked."""
    arm, _, lr = pair.partition("=")
    if arm not in ARMS:
        raise SystemExit(f"--controls: {arm!r} in {pair!r} is not an arm; choose from {', '.join(ARMS)}")
    try:
        return arm, float(lr)
    except ValueError:
        raise SystemExit(f"--controls: {pair!r} needs ARM=LR with a number for LR") from None


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="privacy_qa")
    stage_names = ["sweep", "seeds", "controls", "ablate", "report", "all"]
    parser.add_argument("--stage", nargs="+", choices=stage_names, default=["all"])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 lrs, a few steps (plumbing only)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS)[:3])
    parser.add_argument("--lrs", type=float, nargs="+", help="every arm's sweep grid (default: each arm's own)")
    parser.add_argument("--sweep-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ablations", nargs="+", help="names from ABLATIONS (default: all)")
    parser.add_argument("--extend-edges", type=int, default=2)
    parser.add_argument(
        "--lr-series", type=float, nargs="+", default=list(LR_SERIES), help="mantissas of the lrs an edge extends to"
    )
    parser.add_argument(
        "--controls", nargs="+", default=[], metavar="ARM=LR", help="stage controls: --seeds of ARM at LR"
    )
    ints = ("train-rows", "epochs", "batch", "rank", "evals-per-epoch", "n-val", "n-test", "max-length")
    for name in (*ints, "fine-eval-every", "fine-eval-until"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--eval-batch", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", help="default runs/study_<task>")
    parser.add_argument("--model-dir", help="another model folder (default: MiniLM / SmolLM2-135M-Instruct)")
    add_gsm8k_dir(parser)
    args = parser.parse_args()
    stages = {"sweep", "seeds", "controls", "ablate", "report"} if "all" in args.stage else set(args.stage)
    args.controls = [control(pair) for pair in args.controls]
    for key, value in (QUICK if args.quick else TASKS[args.task]).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.quick:
        args.seeds, args.ablation_seeds, args.sweep_seeds = args.seeds[:2], args.ablation_seeds[:1], [0]
    args.out = args.out or f"runs/study_{args.task}{'_quick' if args.quick else ''}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model_dir is None:
        args.model_dir = default_model(args, out)
    lock = threading.Lock()

    def log(message: str) -> None:
        with lock:
            print(time.strftime("%H:%M:%S"), message, file=sys.stderr, flush=True)

    began = time.time()
    chosen = sweep(args, out, log) if "sweep" in stages else None
    if "seeds" in stages:
        chosen = chosen or stored_best_lrs(out)
        specs = [spec_for(args, arm, chosen[arm], s) for arm in args.arms if chosen.get(arm) for s in args.seeds]
        run_all(specs, out, log, args.jobs)
    if "controls" in stages:
        run_all([spec_for(args, m, lr, s) for m, lr in args.controls for s in args.seeds], out, log, args.jobs)
    if "ablate" in stages:
        chosen = chosen or stored_best_lrs(out)
        lr = chosen.get("lora_over_static")
        if lr is None:
            raise SystemExit("ablations: LoRA-Over static has no best lr (not swept, or every sweep run failed)")
        names = args.ablations or [name for name, _, _ in ABLATIONS]
        arms = [(m, k) for name, m, k in ABLATIONS if name in names]
        run_all([spec_for(args, m, lr, s, k) for m, k in arms for s in args.ablation_seeds], out, log, args.jobs)
    print(f"# Over-parameterization study: {args.task}{' (quick)' if args.quick else ''}\n")
    print(f"command: python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")
    print(machine_line())
    print(f"wall time of this invocation {time.time() - began:.0f} s; runs in {out}/runs\n")
    if "report" in stages:
        from study_report import report

        report(args, out, ABLATIONS, spec_for, run_key, selection(args.task))


def default_model(args: argparse.Namespace, out: Path) -> str:
    """The task's model folder: the real ones, or --quick's tiny ones built here."""
    if args.quick:
        from benchlib.models import save_tiny_llama, tiny_bert

        if args.task == "gsm8k":
            return save_tiny_llama(out / "tiny-llama", gsm8k_dir=args.gsm8k_dir)
        return str(tiny_bert(out / "tiny-bert", args.gsm8k_dir))
    if args.task == "gsm8k":
        from lora_over_trl.utils.smollm2 import smollm2_folder

        return str(smollm2_folder())
    from benchlib.models import minilm_folder

    return minilm_folder()


if __name__ == "__main__":
    main()
