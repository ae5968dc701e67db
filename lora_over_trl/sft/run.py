"""Supervised fine-tuning from a YAML recipe: TRL's ``SFTTrainer`` plus the method's callback, then the outputs.

    python -m lora_over_trl.sft recipes/demo_cpu.yaml                       # the offline CPU demo
    accelerate launch -m lora_over_trl.sft recipes/llama2_mtbench.yaml      # QLoRA, Llama-2-7B, one GPU
    accelerate launch -m lora_over_trl.sft RECIPE.yaml --learning_rate 1e-4 --lora_over.budget_ratio 0.25

The recipe path is positional; ``--key value`` flags override recipe keys, ``--SECTION.KEY value`` one setting
of the method's section (:mod:`lora_over_trl.sft.recipe`). The run writes into ``output_dir``: ``checkpoint-N/``
(resumable), ``adapter/`` (collapsed, standard PEFT, with the tokenizer), ``merged/`` (``merge: true``; GLoRA
always), the method's own files (the registry's ``outputs``), ``summary.json`` and ``eval/`` (``eval_tasks``).
Each appears whole or not at all. Bad input stops before any work with one line and exit code 2.

This module reads top to bottom: check everything, load data and model, build the trainer, train, save,
score, report. Nothing here depends on which method runs: :mod:`lora_over_trl.registry` says.
"""

from __future__ import annotations

import gc
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lora_over_trl.registry import get_method, load
from lora_over_trl.sft.checks import (
    SUMMARY_FILE,
    RecipeError,
    check_environment,
    check_output_dir,
    name_the_field,
    resolve_model_path,
    resume_checkpoint,
)
from lora_over_trl.sft.data import load_train_eval_data
from lora_over_trl.sft.outputs import gathered_adapter_state, remove_if_empty, run_summary, save_outputs
from lora_over_trl.sft.recipe import make_parser, parse_recipe
from lora_over_trl.sft.report import check_eval_args, evaluate, final_report
from lora_over_trl.sft.trainer import build_trainer, load_model_and_tokenizer
from lora_over_trl.utils.atomic import write_json
from lora_over_trl.utils.callbacks import ScheduleSetupError
from lora_over_trl.utils.distributed import launch_mode
from lora_over_trl.utils.errors import one_line

__all__ = ["end_process_group", "main", "train"]

logger = logging.getLogger(__name__)


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


def train(parsed: tuple[Any, ...]) -> Path:
    """The whole run for already parsed arguments; returns ``output_dir``."""
    script_args, training_args, model_args, dataset_args, run_args, method_config = parsed
    method = get_method(run_args.method)
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
    if method.unused_parameters(method_config) and training_args.world_size > 1:
        # weights a schedule takes over, or that a step's GLoRA choice leaves out, get no gradient
        if training_args.ddp_find_unused_parameters is None:
            training_args.ddp_find_unused_parameters = True
    if method.held_out is not None and eval_data is None:  # scored after training on held-out training rows
        split = train_data.train_test_split(test_size=method.held_out(method_config), seed=training_args.seed)
        train_data, eval_data = split["train"], split["test"]
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)

    from accelerate import PartialState  # here: `--help` and bad recipes stay fast

    state = PartialState()
    state.wait_for_everyone()  # every process passed the checks; now the main one may clear a replaced run
    if state.is_main_process:
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    try:  # SFTTrainer and the callback check data and schedule here, before any step
        trainer, callback = build_trainer(
            model, tokenizer, train_data, eval_data, training_args, model_args, method.name, method_config
        )
        _warn_if_not_sharded(trainer)
        if method.held_out is not None and len(trainer.eval_dataset) == 0:
            raise ScheduleSetupError(
                "no held-out row left for the search after SFT preparation (rows whose completion max_length "
                "cuts off are dropped); raise glora.search_fraction or max_length, or give an eval split"
            )
        trainer.train(resume_from_checkpoint=resume)
    except ScheduleSetupError as err:
        remove_if_empty(output_dir, existed)
        raise RecipeError(f"{method.section}: {err}") from err
    except ValueError as err:
        if "trainer" in locals():
            raise  # from training itself: a bug, not bad input; keep the traceback
        remove_if_empty(output_dir, existed)
        raise RecipeError(name_the_field(one_line(err))) from err

    adapter_state = gathered_adapter_state(trainer.model)  # every process: FSDP2 gathers the shards collectively
    if state.is_main_process:
        if method.finish is not None:
            load(method.finish)(trainer, output_dir=output_dir)
        save_outputs(trainer, tokenizer, output_dir, method.name, run_args.merge, model_args, adapter_state)
        summary = run_summary(trainer, callback, started, method.name, model_args)
        summary["resumed_from"] = resume
        write_json(output_dir / SUMMARY_FILE, summary)
    # the other processes stop here: scoring can outlast a collective's timeout
    state.wait_for_everyone()
    if state.is_main_process and run_args.eval_tasks:
        del trainer, model, callback  # the callback holds the model too
        _release_memory()
        summary["eval"] = evaluate(output_dir, run_args, model_args, training_args)
        write_json(output_dir / SUMMARY_FILE, summary)
    if state.is_main_process:
        print(final_report(output_dir, summary, run_args, model_args, training_args))
    return output_dir


def _warn_if_not_sharded(trainer) -> None:
    """The launcher asked for FSDP or DeepSpeed and the accelerator runs neither: accelerate (1.16) switches FSDP on
    only for GPU process groups, and a CPU run trains as DDP, every process with the whole model. Said once, since
    the run itself still works."""
    from accelerate.utils import DistributedType

    mode = launch_mode(trainer.args)
    running = trainer.accelerator.distributed_type
    if mode is not None and running not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        if trainer.accelerator.is_main_process:
            logger.warning(
                "the launcher asked for %s, but accelerate did not switch it on (it runs FSDP only on GPUs): this run "
                "trains as %s (every process holds the whole model)",
                mode.label,
                "DDP" if trainer.args.world_size > 1 else "one process",
            )


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quiet_library_notices() -> None:
    """Silence notices about the libraries' own internals that no recipe setting can prevent.

    bitsandbytes logs at import, on every CPU run, that its optional `kernels` package is missing (its CPU 4-bit
    path works without it); PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` whenever it
    wraps a model. Our own warnings and the libraries' other ones stay.
    """
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def end_process_group() -> None:
    """Tear down a multi-process run's process group before the interpreter exits: left to interpreter teardown,
    its background threads can abort a finished run (SIGABRT, "terminate called without an active exception")."""
    distributed = sys.modules.get("torch.distributed")  # never imported: no process group to end
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
