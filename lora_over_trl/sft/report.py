"""After training: the run scored with :mod:`lora_over_trl.eval`, and the end-of-run report (what was written,
the scores beside the base's, and the plain ``lm_eval`` line that reproduces them)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path
from typing import Any

from lora_over_trl.sft.checks import SUMMARY_FILE, RecipeError
from lora_over_trl.sft.outputs import merged_dtype
from lora_over_trl.utils.errors import one_line

__all__ = ["check_eval_args", "evaluate", "final_report"]

logger = logging.getLogger(__name__)


def evaluate(output_dir: Path, run_args: Any, model_args: Any, training_args: Any) -> dict[str, Any]:
    """Score the run's artifact (``adapter/``, or the method's ``merged/``) and the base with :mod:`lora_over_trl.eval`;
    returns the metrics by model."""
    from lora_over_trl.eval import command as lm_eval_command
    from lora_over_trl.registry import get_method

    common = _eval_flags(run_args)
    if training_args.use_cpu:
        common += ["--device", "cpu"]
    quantized = ["--load_in_4bit"] if model_args.load_in_4bit else []
    # an artifact other than the adapter (GLoRA's merged float32 model) is the trained function: not re-quantized
    artifact = get_method(run_args.method).artifact
    targets = {"adapter": (output_dir / artifact, quantized if artifact == "adapter" else [])}
    if run_args.eval_base:
        targets["base"] = (Path(model_args.model_name_or_path), quantized)
    scores = {}
    for label, (path, flags) in targets.items():
        out = output_dir / ("eval" if label == "adapter" else "eval-base")
        args = lm_eval_command.make_parser().parse_args([str(path), *common, *flags, "--output", str(out)])
        try:
            written = lm_eval_command.run(args)
        except lm_eval_command.JudgeError as err:  # training's outputs are saved; the answers stay in `out`
            raise RecipeError(f"eval_args: {err}") from err
        summary = json.loads((written / "summary.json").read_text())
        scores[label] = summary.get("lm_eval", {}) | mt_bench_scores(summary.get("mt_bench"))
    return scores


def mt_bench_scores(judged: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """The judged MT-Bench numbers as one more task in the score table: mean rating (overall, per turn) and, against
    a baseline, the win/tie/loss rates."""
    if not judged:
        return {}
    single, pairwise = judged["single"], judged.get("pairwise") or {}
    scores = {key: single[key] for key in ("score", "turn_1", "turn_2", "unparsable") if single.get(key) is not None}
    for key in ("win_rate", "loss_rate", "win_rate_adjusted"):
        if pairwise.get(key) is not None:
            scores[f"{key} vs {pairwise['baseline']}"] = pairwise[key]
    return {f"mt_bench (judge {judged['judge']})": scores}


def check_eval_args(run_args: Any) -> None:
    """Parse ``eval_tasks``/``eval_args`` now, so a typo fails before training rather than after."""
    if not run_args.eval_tasks:  # no evaluation; `--eval_tasks=` turns a recipe's off, its eval_args left unused
        if run_args.eval_base or run_args.eval_args:
            logger.info("eval_tasks is empty: no evaluation (eval_base and eval_args are not used)")
        return
    from lora_over_trl.eval import command as lm_eval_command

    parser = lm_eval_command.make_parser()
    parser.exit_on_error = False  # bad values raise ArgumentError instead of printing usage and exiting
    try:
        args, unknown = parser.parse_known_args(["unused", *_eval_flags(run_args)])
        if unknown:
            raise lm_eval_command.UsageError(f"unknown flag {unknown[0]} (see python -m lora_over_trl.eval --help)")
        lm_eval_command.check_args(args)
    except (argparse.ArgumentError, lm_eval_command.UsageError) as err:
        raise RecipeError(f"eval_tasks/eval_args: {one_line(err)}") from err


def _eval_flags(run_args: Any) -> list[str]:
    """The flags of :mod:`lora_over_trl.eval` the recipe asks for (tasks, then ``eval_args``)."""
    return ["--tasks", run_args.eval_tasks, *shlex.split(run_args.eval_args)]


def final_report(output_dir: Path, summary: dict[str, Any], run_args: Any, model_args, training_args) -> str:
    """What the run produced, where, its scores (adapter beside base) and how plain lm-eval reproduces them."""
    from lora_over_trl.registry import get_method

    lines = [f"done: {summary['method']}, {summary['steps']} steps in {summary['wall_seconds']:.0f} s; outputs:"]
    outputs = [
        ("adapter/", "the collapsed, standard PEFT LoRA adapter (with the tokenizer)"),
        ("merged/", "the base with the update merged in: a plain model folder"),
        *get_method(run_args.method).outputs,
        ("eval/", "lm-eval results of adapter/ (eval-base/: of the base)"),
        (SUMMARY_FILE, "losses, timings, memory, scores"),
    ]
    lines += [f"  {output_dir / name}  {what}" for name, what in outputs if (output_dir / name).exists()]
    scores = summary.get("eval")
    if scores:
        lines += _score_table(scores)
        lines += _reproduction(output_dir, run_args, model_args, training_args)
    return "\n".join(lines)


def _score_table(scores: dict[str, dict[str, Any]]) -> list[str]:
    """``task  metric  adapter  base`` rows, the adapter's and the base's scores side by side."""
    labels = [label for label in ("adapter", "base") if label in scores]
    lines = ["scores:  " + "  ".join(f"{label:>8}" for label in labels) + "  task, metric (filter)"]
    for task, metrics in scores["adapter"].items():
        for key, value in metrics.items():
            if not isinstance(value, int | float) or "_stderr" in key or key in ("sample_len", "sample_count"):
                continue
            row = [scores[label].get(task, {}).get(key) for label in labels]
            cells = "  ".join(f"{v:>8.4f}" if isinstance(v, int | float) else f"{'-':>8}" for v in row)
            size = metrics.get("sample_len")
            metric = f"{key.replace(',', ' (')})" if "," in key else key  # lm-eval's "metric,filter"
            lines.append(f"         {cells}  {task}, {metric}{f', {size} items' if size else ''}")
    return lines


def _reproduction(output_dir: Path, run_args: Any, model_args, training_args) -> list[str]:
    """The plain lm-eval lines that give the adapter's score, with lm-eval's ``hf`` model and its ``vllm`` one: on
    ``merged/`` for a 4-bit run, else base + adapter."""
    from lora_over_trl.eval import command as lm_eval_command

    args = lm_eval_command.make_parser().parse_args(["unused", *_eval_flags(run_args)])
    if not lm_eval_command.lm_eval_tasks(args):
        return []  # MT-Bench only: no lm-eval task to reproduce
    if training_args.use_cpu:
        args.device = "cpu"
    merged = output_dir / "merged"
    if merged.is_dir():
        args.dtype = str(merged_dtype(model_args)).removeprefix("torch.")
        pretrained, peft = str(merged), None
    elif model_args.load_in_4bit:
        return [
            "plain lm-eval cannot load a 4-bit base: set merge: true for merged/ (the trained function, which it "
            "scores as here); the adapter on the full-precision base scores differently (docs/evaluation.md)"
        ]
    else:
        pretrained, peft = model_args.model_name_or_path, str(output_dir / "adapter")
    return [
        "the adapter's score with plain lm-eval (transformers; on a GPU with vLLM installed, the second line):",
        "  " + lm_eval_command.plain_lm_eval_command(pretrained, args, peft=peft),
        "  " + lm_eval_command.plain_lm_eval_command(pretrained, args, peft=peft, model="vllm"),
    ]
