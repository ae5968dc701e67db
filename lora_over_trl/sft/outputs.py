"""What the SFT command writes: ``adapter/`` (gathered from FSDP2 shards when sharded), ``merged/`` and
``summary.json``; each appears whole or not at all."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

__all__ = ["gathered_adapter_state", "merged_dtype", "remove_if_empty", "run_summary", "save_outputs"]


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


def save_outputs(trainer, tokenizer, output_dir: Path, method: str, merge: bool, model_args: Any, adapter_state=None):
    """``adapter/`` (and ``merged/`` with ``merge``), each staged and renamed into place; a method with its own
    outputs (the registry's ``save``: GLoRA's merged model) writes them instead.

    ``adapter_state``: the LoRA weights gathered from FSDP2 shards (:func:`gathered_adapter_state`), saved instead
    of the model's own."""
    from lora_over_trl.registry import get_method, load
    from lora_over_trl.utils.atomic import staged_directory
    from lora_over_trl.utils.export import export_merged

    custom = get_method(method).save
    if custom is not None:
        load(custom)(trainer, tokenizer, output_dir)
        return
    with staged_directory(output_dir / "adapter", overwrite=True) as staging:
        trainer.model.save_pretrained(staging, state_dict=adapter_state)
        tokenizer.save_pretrained(staging)
    if merge:
        export_merged(
            trainer.model,
            output_dir / "merged",
            tokenizer=tokenizer,
            overwrite=True,
            dtype=merged_dtype(model_args),
            adapter_state=adapter_state,
        )


def merged_dtype(model_args: Any):
    """``merged/`` in the recipe's dtype (bfloat16 for a 7B: half the folder), float32 when it names none."""
    import torch

    return getattr(torch, model_args.dtype) if model_args.dtype in ("float32", "bfloat16", "float16") else torch.float32


def run_summary(trainer, callback, started: float, method: str, model_args: Any) -> dict[str, Any]:
    """``summary.json``: losses, timings, memory, the launch mode, and the method's own fields."""
    import torch

    history = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    tokens = max((float(h["num_tokens"]) for h in history if "num_tokens" in h), default=None)
    final = next((h for h in reversed(history) if "train_runtime" in h), {})
    summary: dict[str, Any] = {
        "method": method,
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
    if callback is not None:  # what the method reports of its own run (schedule, chain, search)
        summary.update(callback.run_summary())
    return summary


def remove_if_empty(folder: Path, existed: bool) -> None:
    """The Trainer creates ``output_dir`` at construction: take it back when the run stops before starting."""
    if not existed and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
