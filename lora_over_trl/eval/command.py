"""Score a run's collapsed adapter (or a merged model) with lm-evaluation-harness, and MT-Bench with an LLM judge.

    python -m lora_over_trl.eval OUTPUT_DIR --tasks gsm8k,humaneval --limit 50 --confirm_run_unsafe_code
    python -m lora_over_trl.eval OUTPUT_DIR/adapter --tasks gsm8k --gsm8k_dir tests/data/gsm8k
    python -m lora_over_trl.eval OUTPUT_DIR --tasks mt_bench --judge_model gpt-4 [--judge_baseline OTHER_RUN]
    python -m lora_over_trl.eval OUTPUT_DIR/eval --judge_model gpt-4      # judge (or finish judging) answers

OUTPUT_DIR is a run folder (with ``adapter/`` or ``merged/``), a PEFT adapter folder, or a model folder.
The model is built here (base, 4-bit when asked, plus the adapter with stock PEFT) and handed to lm-eval
as an instance: lm-eval's own ``model_args`` cannot load a 4-bit base. Task names: ``gsm8k``, ``gsm8k_cot``
(chat, 8-shot chain of thought), ``humaneval``, ``humaneval_instruct``, ``humaneval_64`` (our offline
wrappers, shipped in the package: ``--tasks_dir`` prints their folder), ``mt_bench``, or any lm-eval task
name. Results (JSON, per-sample logs, a table, MT-Bench answers) go to ``OUTPUT_DIR/eval-<time>/``, written whole
or not at all. MT-Bench judgments are then appended to ``mt_bench/model_judgment/`` there, resumably: given an
eval folder that holds ``mt_bench/model_answer/``, the command judges those answers and skips the rows already
judged. The judge's API key is read from the variable ``--judge_api_key_env`` names (never from a file).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from lora_over_trl.eval.backends import BACKENDS, load, vllm_lora_rank
from lora_over_trl.eval.judge import JudgeError

TASK_ALIASES = {
    "gsm8k": "gsm8k_local",
    "gsm8k_cot": "gsm8k_local_cot_llama",
    "humaneval": "humaneval_local",
    "humaneval_instruct": "humaneval_local_instruct",
    "humaneval_64": "humaneval_local_64",
}
# The task wrappers are package data (lora_over_trl/eval/tasks), found through the installed package, not the checkout.
TASKS_DIR = Path(str(resources.files("lora_over_trl.eval") / "tasks"))


class UsageError(ValueError):
    """Bad input: reported as one line, exit code 2."""


class _PrintTasksDir(argparse.Action):
    """``--tasks_dir``: print the shipped wrappers' folder and exit, like ``--version`` (no PATH needed)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(TASKS_DIR)
        parser.exit()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_over_trl.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="run folder, adapter folder, or model folder")
    parser.add_argument(
        "--tasks_dir",
        action=_PrintTasksDir,
        help="print the folder of the shipped task wrappers (for `lm_eval --include_path`) and exit",
    )
    parser.add_argument("--tasks", default="gsm8k", help="comma-separated task names (default: gsm8k)")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (int) or fraction (< 1)")
    parser.add_argument("--base", default=None, help="base model path or hub id (default: from adapter_config)")
    parser.add_argument("--load_in_4bit", action="store_true", help="load the base in 4-bit NF4 (bitsandbytes)")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="hf: transformers + PEFT; vllm: lm-eval's vLLM model, batched MT-Bench answers (auto: vllm when it is "
        "installed and a GPU is present)",
    )
    parser.add_argument("--max_model_len", type=int, default=None, help="vLLM's context length (default: the model's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--apply_chat_template", action="store_true")
    parser.add_argument("--gen_kwargs", default=None, help="lm-eval generation overrides, e.g. max_gen_toks=256")
    parser.add_argument("--gsm8k_dir", default=None, help="local GSM8K folder (train.jsonl, test.jsonl)")
    parser.add_argument(
        "--mt_bench_questions", default=None, help="a FastChat question.jsonl (default: FastChat's 80 questions)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=1024, help="MT-Bench answer length (FastChat's: 1024)")
    parser.add_argument("--model_id", default=None, help="the name MT-Bench answers carry (default: the run folder's)")
    judge = parser.add_argument_group("MT-Bench judge (any OpenAI-compatible chat endpoint)")
    judge.add_argument("--judge_model", default=None, help="the judge model's name at the endpoint, e.g. gpt-4")
    judge.add_argument("--judge_base_url", default=None, help="e.g. http://localhost:8000/v1 (default: OpenAI's)")
    judge.add_argument(
        "--judge_api_key_env", default="OPENAI_API_KEY", help="the environment variable holding the judge's API key"
    )
    judge.add_argument(
        "--judge_baseline",
        default=None,
        help="also judge pairwise against these answers: another run or eval folder, or a model_answer .jsonl",
    )
    judge.add_argument("--judge_parallel", type=int, default=8, help="concurrent judge requests (default: 8)")
    judge.add_argument("--judge_max_tokens", type=int, default=2048, help="judge reply length (FastChat's: 2048)")
    judge.add_argument(
        "--judge_structured_outputs",
        action="store_true",
        help="decode the judge under a regex ending in the verdict (vLLM/SGLang servers), for small local judges",
    )
    parser.add_argument("--include_path", default=str(TASKS_DIR), help="folder of lm-eval task YAMLs")
    parser.add_argument("--output", default=None, help="results folder (default: PATH/eval-<time>)")
    parser.add_argument(
        "--confirm_run_unsafe_code", action="store_true", help="allow HumanEval to execute model-written code"
    )
    return parser


def resolve_checkpoint(path: Path, base: str | None) -> tuple[str, Path | None]:
    """``(base model, adapter folder or None)`` for a run, adapter or model folder."""
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            if (candidate / "lora_over.json").is_file():
                raise UsageError(
                    f"{candidate} is an over-parameterized training checkpoint; evaluate the collapsed adapter "
                    "(collapse(model) then save_pretrained) or the run's adapter/ folder"
                )
            recorded = json.loads((candidate / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not (base or recorded):
                raise UsageError(f"{candidate}/adapter_config.json names no base model; pass --base")
            return base or recorded, candidate
    for candidate in (path / "merged", path):
        if (candidate / "config.json").is_file():
            return str(candidate), None
    raise UsageError(f"{path}: no adapter_config.json or config.json in it, its adapter/ or its merged/ folder")


def task_manager(include_path: str, tasks: list[str], metadata: dict[str, Any] | None = None) -> Any:
    """lm-eval's ``TaskManager`` over ``include_path``; lm-eval's own task index (about 15,000 YAMLs, seconds to read)
    only when a task is not in ``include_path``."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_path, include_defaults=False, metadata=metadata)
    if all(task in local.all_tasks for task in tasks):
        return local
    return TaskManager(include_path=include_path, metadata=metadata)


def task_names(args: argparse.Namespace) -> list[str]:
    """The names in ``--tasks``, as given."""
    return [t.strip() for t in args.tasks.split(",") if t.strip()]


def lm_eval_tasks(args: argparse.Namespace) -> list[str]:
    """The lm-eval task names ``--tasks`` stands for (our aliases resolved, MT-Bench left out), unchecked."""
    return [TASK_ALIASES.get(n, n) for n in task_names(args) if n != "mt_bench"]


def check_args(args: argparse.Namespace) -> tuple[list[str], bool]:
    """lm-eval task names and whether MT-Bench was asked for; every problem is a UsageError."""
    names = task_names(args)
    if not names:
        raise UsageError("--tasks is empty; name at least one task, e.g. --tasks gsm8k")
    tasks = lm_eval_tasks(args)
    if any(t.startswith("humaneval") for t in tasks) and not args.confirm_run_unsafe_code:
        raise UsageError("HumanEval executes model-written code: add --confirm_run_unsafe_code to allow it")
    for flag in ("mt_bench_questions", "gsm8k_dir"):
        value = getattr(args, flag)
        if value and not Path(value).exists():
            raise UsageError(f"--{flag} {value} does not exist")
    if not Path(args.include_path).is_dir():
        raise UsageError(f"--include_path {args.include_path} is not a folder of task YAMLs")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be > 0, got {args.limit:g}")
    if args.load_in_4bit and args.backend == "vllm":
        raise UsageError(
            "--backend vllm with --load_in_4bit: vLLM's 4-bit is not the NF4 base the adapter was trained on; score "
            "the run's merged/ (merge: true), the trained function, or use --backend hf"
        )
    if "mt_bench" in names:
        check_mt_bench_args(args)
    elif args.judge_model:
        raise UsageError(f"--judge_model {args.judge_model} judges MT-Bench answers: add mt_bench to --tasks")
    if tasks:
        known = set(task_manager(args.include_path, tasks).all_tasks)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise UsageError(f"unknown task(s) {unknown}; ours: {sorted(TASK_ALIASES)} + mt_bench, or any lm-eval task")
    return tasks, "mt_bench" in names


def check_mt_bench_args(args: argparse.Namespace) -> None:
    """The MT-Bench data and the judge's settings, checked without contacting the judge."""
    try:
        from lora_over_trl.eval.fastchat_data import llm_judge_folder

        if not args.mt_bench_questions or args.judge_model:  # FastChat's questions, or its judge prompts
            llm_judge_folder()
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err
    if not args.judge_model:
        for flag in ("judge_baseline", "judge_base_url"):
            if getattr(args, flag):
                raise UsageError(f"--{flag} {getattr(args, flag)} needs a judge: add --judge_model")
        return
    if importlib.util.find_spec("openai") is None:
        raise UsageError("--judge_model needs the `openai` client: pip install 'lora-over-trl[judge]'")
    for flag in ("judge_parallel", "judge_max_tokens"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.judge_base_url is None and not os.environ.get(args.judge_api_key_env):
        raise UsageError(
            f"--judge_api_key_env: ${args.judge_api_key_env} is not set; OpenAI's API needs a key there "
            "(a local judge: give its --judge_base_url)"
        )
    if args.judge_baseline:
        baseline_answers(args.judge_baseline)


def baseline_answers(where: str) -> Path:
    """The ``model_answer`` file of ``--judge_baseline``: the file itself, or the one answer file of a run folder,
    an eval folder or an MT-Bench folder."""
    from lora_over_trl.eval.mt_bench import answer_files

    path = Path(where)
    if path.is_file():
        return path
    for folder in (path / "eval" / "mt_bench", path / "mt_bench", path):
        files = answer_files(folder)
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise UsageError(f"--judge_baseline {where}: {len(files)} answer files in {folder}/model_answer; name one")
    raise UsageError(f"--judge_baseline {where}: no MT-Bench answers (model_answer/*.jsonl) in it or its eval/")


def judge_settings(args: argparse.Namespace) -> Any:
    """The judge's settings from the flags, or None without ``--judge_model``."""
    if not args.judge_model:
        return None
    from lora_over_trl.eval.judge import JudgeSettings

    return JudgeSettings(
        model=args.judge_model,
        base_url=args.judge_base_url,
        api_key_env=args.judge_api_key_env,
        parallel=args.judge_parallel,
        max_tokens=args.judge_max_tokens,
        structured=args.judge_structured_outputs,
    )


def run(args: argparse.Namespace) -> Path:
    from lora_over_trl.eval.mt_bench import answer_files
    from lora_over_trl.utils.atomic import staged_directory

    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if answer_files(path / "mt_bench"):  # an eval folder: judge (or finish judging) its MT-Bench answers
        if not args.judge_model:
            raise UsageError(f"{path} holds MT-Bench answers: name a judge with --judge_model to score them")
        check_mt_bench_args(args)
        record_judgment(path, args)
        return path
    tasks, mt_bench = check_args(args)
    settings = judge_settings(args)
    if settings is not None:
        from lora_over_trl.eval.judge import connect

        connect(settings)  # before anything is loaded: a dead endpoint or a wrong name costs nothing yet
    base, adapter = resolve_checkpoint(path, args.base)
    loaded = load(base, adapter, args)
    output = Path(args.output) if args.output else path / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    with staged_directory(output) as staging:
        summary: dict[str, Any] = {"base": base, "adapter": str(adapter) if adapter else None}
        summary["backend"] = loaded.backend
        if tasks:
            summary["lm_eval"] = run_lm_eval(loaded.lm, tasks, args, staging)
        if mt_bench:
            from lora_over_trl.eval.mt_bench import answer_questions, read_questions, write_answers

            questions = read_questions(args.mt_bench_questions, int(args.limit) if args.limit else None)
            name = args.model_id or model_name(path, base, adapter)
            answers = answer_questions(questions, loaded.generator, name)
            written = write_answers(answers, staging / "mt_bench")
            summary["mt_bench_answers"] = str(output / written.relative_to(staging))
        (staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if settings is not None:
        record_judgment(output, args)
    return output


def model_name(path: Path, base: str, adapter: Path | None) -> str:
    """The name MT-Bench answers carry: the run folder's for a run's ``adapter/`` or ``merged/``, else the folder's."""
    folder = adapter if adapter is not None else Path(base)
    return folder.parent.name if folder.name in ("adapter", "merged") and folder.parent.name else folder.name


def record_judgment(eval_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Judge ``eval_dir/mt_bench``'s answers (resuming), print the tables and add the scores to its summary.json.

    Raises:
        JudgeError: the judge failed; the answers and every judgment written so far stay in ``eval_dir``.
    """
    from lora_over_trl.eval.mt_bench import judge_folder, read_questions
    from lora_over_trl.utils.atomic import write_json

    baseline = baseline_answers(args.judge_baseline) if args.judge_baseline else None
    try:
        result = judge_folder(
            eval_dir / "mt_bench", judge_settings(args), read_questions(args.mt_bench_questions), baseline=baseline
        )
    except JudgeError as err:
        raise JudgeError(
            f"{err}. The answers stay in {eval_dir}; judge them with `python -m lora_over_trl.eval {eval_dir} "
            "--judge_model ...` (rows already judged are kept)"
        ) from err
    summary_file = eval_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    summary["mt_bench"] = result
    write_json(summary_file, summary)
    print((eval_dir / "mt_bench" / "results.md").read_text())
    return result


def run_lm_eval(lm: Any, tasks: list[str], args: argparse.Namespace, out: Path) -> dict:
    import logging

    import lm_eval

    # lm-eval narrates every phase at INFO (tasks selected, contexts built, seeds set); its warnings stay
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    from lm_eval.utils import make_table

    metadata = {"gsm8k_dir": str(Path(args.gsm8k_dir).resolve())} if args.gsm8k_dir else None
    limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager(args.include_path, tasks, metadata),
        num_fewshot=args.num_fewshot,
        limit=limit,
        log_samples=True,
        apply_chat_template=args.apply_chat_template,
        gen_kwargs=args.gen_kwargs,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code,
    )
    samples = results.pop("samples", {})
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    for task, rows in samples.items():
        with (out / f"samples_{task}.jsonl").open("w") as handle:
            handle.writelines(json.dumps(row, default=str) + "\n" for row in rows)
    table = make_table(results)
    (out / "results.md").write_text(table)
    print(table)
    return results["results"]


def plain_lm_eval_command(pretrained: str, args: argparse.Namespace, peft: str | None = None, model: str = "hf") -> str:
    """The ``lm_eval`` command line that scores a model folder (or a base plus ``peft`` adapter) as ``args`` asked,
    with lm-eval's ``hf`` or ``vllm`` model.

    Plain lm-eval loads ``pretrained`` in ``args.dtype`` without quantization: for a run trained on a 4-bit base
    give it the run's ``merged/`` folder (the dequantized base plus the update, the trained function). ``args`` are
    taken as already checked (:func:`check_args`).
    """
    tasks = lm_eval_tasks(args)
    model_args = f"pretrained={pretrained},dtype={args.dtype}"
    if model == "hf":
        model_args += f",peft={peft}" if peft else ""
        batch_size = str(args.batch_size)
    else:
        model_args += f",lora_local_path={peft},max_lora_rank={vllm_lora_rank(Path(peft))}" if peft else ""
        batch_size = "auto"
    parts = ["lm_eval", "--model", model, "--model_args", model_args, "--include_path", args.include_path]
    parts += ["--tasks", ",".join(tasks), "--batch_size", batch_size]
    if args.device and model == "hf":
        parts += ["--device", args.device]
    for flag in ("num_fewshot", "limit", "gen_kwargs"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag}", f"{value:g}" if isinstance(value, float) else str(value)]
    if args.gsm8k_dir:
        parts += ["--metadata", json.dumps({"gsm8k_dir": str(Path(args.gsm8k_dir).resolve())})]
    for flag in ("apply_chat_template", "confirm_run_unsafe_code"):
        if getattr(args, flag):
            parts.append(f"--{flag}")
    return shlex.join(parts)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        output = run(args)
    except (UsageError, FileNotFoundError, FileExistsError, ValueError, JudgeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"results written to {output}")
    return 0
