"""GLoRA in any ``Trainer`` or TRL ``SFTTrainer`` run: a callback for the supernet, a function for the search.

    trainer = SFTTrainer(..., peft_config=LoraConfig(r=8, ...), callbacks=[GloraCallback(GloraConfig())])
    trainer.train()
    search_glora(trainer, held_out)                    # evolutionary search; fixes each layer's choice
    export_glora(trainer.model, "merged")              # re-parameterized: a plain model folder

- ``on_init_end``: every LoRA layer becomes a GLoRA layer (before the optimizer exists, so it holds the new
  weights).
- ``on_step_begin``: a choice per layer, drawn from ``(seed, step)`` alone: every process agrees and a resumed
  run draws what the uninterrupted one did. Checkpoints need nothing extra: every GLoRA weight sits under
  PEFT's ``lora_A`` and is saved and restored by the Trainer.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lora_over_trl.methods.glora.config import GloraConfig
from lora_over_trl.methods.glora.model import (
    Choice,
    choice_params,
    fix_choices,
    glora_modules,
    install_glora,
    sample_choices,
)
from lora_over_trl.methods.glora.search import SearchResult, evolutionary_search
from lora_over_trl.registry import METHODS, refusal
from lora_over_trl.utils.atomic import write_json
from lora_over_trl.utils.callbacks import ScheduleSetupError
from lora_over_trl.utils.distributed import launch_mode
from lora_over_trl.utils.peft_layers import lora_modules

__all__ = ["SEARCH_FILE", "GloraCallback", "held_out_fitness", "search_glora"]

(SEARCH_FILE,) = METHODS["glora"].output_files  # named in the registry, with what it holds


class GloraCallback(TrainerCallback):
    """Install GLoRA layers and draw a choice per layer each step.

    Args:
        config: the :class:`GloraConfig`.

    Raises:
        ScheduleSetupError: at ``on_init_end`` when the model has no LoRA layers, a rank is out of range, or a
            multi-process run lacks ``ddp_find_unused_parameters=True`` (a step's choice leaves weights unused), or
            the run is sharded (FSDP, DeepSpeed: :func:`lora_over_trl.registry.refusal`).
    """

    def __init__(self, config: GloraConfig) -> None:
        self.config = config
        self.spaces: dict[str, dict[str, list[str]]] = {}
        self.fixed = False  # set by search_glora: the chosen configuration stays
        self.search: SearchResult | None = None  # search_glora's result
        self.model = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        refused = refusal("glora", self.config, launch_mode(args))
        if refused:
            raise ScheduleSetupError(f"GloraCallback: {refused}")
        if not lora_modules(model, self.config.adapter_name):
            raise ScheduleSetupError(
                "GloraCallback: the model has no LoRA layers; pass peft_config=LoraConfig(...) to the trainer"
            )
        if args.world_size > 1 and not args.ddp_find_unused_parameters:
            raise ScheduleSetupError("GLoRA leaves weights unused in a step: set ddp_find_unused_parameters=True")
        try:
            self.spaces = install_glora(model, self.config)
        except ValueError as err:
            raise ScheduleSetupError(str(err)) from err
        self.model = model
        self._draw(0)

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.fixed:
            self._draw(state.global_step)

    def _draw(self, step: int) -> None:
        rng = random.Random(f"glora:{self.config.seed}:{step}")
        fix_choices(self.model, sample_choices(self.spaces, rng), self.config.adapter_name)

    def run_summary(self) -> dict[str, Any]:
        """The SFT command's ``summary.json`` fields of this run: the search's held-out loss, the chosen
        configuration's size, and why its result is not LoRA-shaped (``None`` when it is)."""
        from lora_over_trl.methods.glora.export import lora_expressible

        search = self.search
        return {
            "glora": {
                "held_out_loss": -search.fitness,
                "params": search.params,
                "evaluations": search.evaluations,
                "not_lora": lora_expressible(self.model, self.config.adapter_name),
            }
        }

    def params(self, choices: dict[str, Choice]) -> int:
        """Adapter parameters of a configuration."""
        layers = glora_modules(self.model, self.config.adapter_name)
        total = 0
        for name, layer in layers.items():
            supernet = layer.lora_A[self.config.adapter_name]
            total += choice_params(choices[name], supernet.out_features, supernet.in_features)
        return total


def held_out_fitness(trainer: Any, dataset: Any = None, batches: int = 8) -> Callable[[dict[str, Choice]], float]:
    """Minus the mean loss of the first ``batches`` batches of ``dataset`` (the trainer's eval dataloader,
    collator included), under a given configuration, weighted by target tokens (causal LM) or examples
    (classification). The batches are read once and kept."""
    loader = trainer.get_eval_dataloader(dataset)
    model = trainer.model
    # what the model's forward takes by name (token_type_ids for BERT; not TRL's completion_mask)
    accepted = set(inspect.signature(model.get_base_model().forward).parameters)
    kept = []
    for index, batch in enumerate(loader):
        if index == batches:
            break
        batch = trainer._prepare_inputs(batch)
        kept.append({key: value for key, value in batch.items() if key in accepted})
    if not kept:
        raise ValueError(
            "GLoRA search: the held-out data gives no batch (is it empty after the trainer's preparation?)"
        )
    adapter = _callback(trainer).config.adapter_name

    @torch.no_grad()
    def fitness(choices: dict[str, Choice]) -> float:
        fix_choices(model, choices, adapter)
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        for batch in kept:
            labels = batch["labels"]
            if labels.shape == batch["input_ids"].shape:  # causal LM: the loss averages the shifted targets
                count = int((labels[..., 1:] != -100).sum())
            else:  # one label per example (classification)
                count = labels.shape[0]
            total += float(model(**batch).loss) * count
            tokens += count
        model.train(was_training)
        return -total / max(tokens, 1)

    return fitness


def search_glora(
    trainer: Any,
    dataset: Any = None,
    *,
    fitness: Callable[[dict[str, Choice]], float] | None = None,
    output_dir: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
) -> SearchResult:
    """Run GLoRA's evolutionary search after training and fix every layer to the chosen configuration.

    Args:
        trainer: the trainer that ran with a :class:`GloraCallback`.
        dataset: held-out data scored by its loss (default: the trainer's ``eval_dataset``); never the test split.
        fitness: score a configuration yourself instead (higher is better), e.g. a task metric.
        output_dir: where to write ``glora_search.json`` (per-generation best fitness, the chosen configuration).
        progress: called after each generation with its record (the default logs it).

    Returns:
        The :class:`~lora_over_trl.methods.glora.search.SearchResult`; the model keeps its choices.
    """
    callback = _callback(trainer)
    config = callback.config
    if fitness is None:
        fitness = held_out_fitness(trainer, dataset, config.search_batches)
    result = evolutionary_search(callback.spaces, fitness, callback.params, config, progress)
    fix_choices(trainer.model, result.choices, config.adapter_name)
    callback.fixed, callback.search = True, result
    if output_dir is not None:
        path = Path(output_dir) / SEARCH_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"config": vars(config), **result.to_dict()}
        if not math.isfinite(result.fitness):
            payload["fitness"] = str(result.fitness)
        write_json(path, payload)
    return result


def _callback(trainer: Any) -> GloraCallback:
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, GloraCallback):
            return callback
    raise ValueError("search_glora: the trainer has no GloraCallback")
