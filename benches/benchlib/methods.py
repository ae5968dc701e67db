"""The methods as the benchmarks run them, and what a worker records: a bench's method label to the package's
callback (``lora_over_trl.registry.build_callback``), the LoRA rank each trains at, the callback's record after
training, the step clock, and a run's last part (scores, timings, versions, atomic write).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchlib.report import library_versions
from lora_over_trl.utils.atomic import write_json

C3LA_WINDOWS = 2  # c3LA trains at LoRA r/2 through two windows: its collapsed adapter has rank r, as the others'

# Labels the benchmarks give a method (their tables' rows, their --methods/--arms choices) that are not a registry
# name: the registry's method and the settings the label stands for. Any other label is a registry name.
LABELS: dict[str, tuple[str, dict]] = {
    "lora_over_static": ("lora_over", {"schedule": "static"}),
    "lora_over_prepass": ("lora_over", {"schedule": "prepass"}),
    "lora_over_dynamic": ("lora_over", {"schedule": "dynamic"}),
    "lora-over": ("lora_over", {"capacity": 1.0}),
    "lora-over-1": ("lora_over", {"capacity": 1.0}),
    "lora-over-0.25": ("lora_over", {"capacity": 0.25}),
    "lora-over-dynamic": ("lora_over", {"capacity": 1.0, "schedule": "dynamic"}),
}


def method_callback(label: str, settings: dict | None = None):
    """The package's Trainer callback for the method ``label`` names, with ``settings`` on top of the label's own
    (``None`` for plain LoRA)."""
    from lora_over_trl.registry import build_callback

    name, implied = LABELS.get(label, (label, {}))
    return build_callback(name, {**implied, **(settings or {})})


def quality_callback(label: str, steps: int, seed: int, glora: dict):
    """The quality benchmarks' callback: LoRA-Over at capacity 1 (dynamic: half the budget, re-allocating every
    eighth of the run, frozen for the last quarter), c3LA through :data:`C3LA_WINDOWS` windows, GLoRA with the
    run's search settings; every method seeded by the run's seed."""
    eighth = max(1, steps // 8)
    settings = {
        "lora_over_static": {"capacity": 1.0},
        "lora_over_dynamic": {
            "capacity": 1.0,
            "budget_ratio": 0.5,
            "warmup_steps": eighth,
            "interval": eighth,
            "final_steps": max(1, steps // 4),
        },
        "c3la": {"chain_interval": max(1, steps // C3LA_WINDOWS)},
        "glora": glora,
    }.get(label, {})
    return method_callback(label, {**settings, "seed": seed})


def lora_rank(method: str, rank: int) -> int:
    """The LoRA ``r`` a method trains at, so that every collapsed adapter has rank ``rank``."""
    return max(1, rank // C3LA_WINDOWS) if method == "c3la" else rank


def put_first(trainer, callback) -> None:
    """Move the method's callback to the front of the Trainer's, as ``lora_over_trl.sft`` orders it."""
    if callback is not None:
        trainer.callback_handler.callbacks.remove(callback)
        trainer.callback_handler.callbacks.insert(0, callback)


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


def finish_run(spec: dict, result: dict, scores: dict, model, began: float, scoring: float) -> None:
    """A worker's last part: record the scores and timings, keep a sweep run's adapter (for the final phase to
    score again), write ``spec['out']``."""
    result["scores"] = scores
    result["score_seconds"] = round(time.time() - scoring, 1)
    if spec.get("save_adapter") and spec["split"] == "validation":
        model.save_pretrained(str(Path(spec["out"]).with_suffix("")))
    result["wall_seconds"] = round(time.time() - began, 1)
    result["versions"] = library_versions()
    write_json(Path(spec["out"]), result, indent=1)


def training_arguments(config_class, spec: dict, max_steps: int, warmup_steps: int | float, **extra):
    """The Trainer settings every quality and study run shares (``config_class``: ``TrainingArguments`` or TRL's
    ``SFTConfig``): CPU, AdamW without weight decay, cosine decay, a log line per step, no saving or evaluation,
    the rows in the order given (a sequential sampler: the same batches for every method)."""
    return config_class(
        output_dir=str(Path(spec["out"]).with_suffix(".trainer")),
        use_cpu=True,
        max_steps=max_steps,
        per_device_train_batch_size=spec["batch"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps,
        optim="adamw_torch",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=spec["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        **extra,
    )


def reload_sweep_run(model, spec: dict, result: dict):
    """The final phase's reuse of a sweep run (``spec['reuse']``, its JSON): its saved adapter on ``model``, its
    training record copied into ``result``. Returns ``(model with the adapter, the sweep run's result)``."""
    from peft import PeftModel

    trained = json.loads(Path(spec["reuse"]).read_text())
    model = PeftModel.from_pretrained(model, str(Path(spec["reuse"]).with_suffix("")))
    result.update(train=trained["train"], curve=trained["curve"], reused_from=spec["reuse"])
    return model, trained
