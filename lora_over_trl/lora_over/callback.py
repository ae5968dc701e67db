"""LoRA-Over in any ``transformers.Trainer`` / TRL ``SFTTrainer`` script: one callback.

    trainer = SFTTrainer(..., peft_config=LoraConfig(...),
                         callbacks=[LoraOverCallback(LoraOverConfig(schedule="dynamic", budget_ratio=0.5))])
    trainer.train()
    trainer.save_model()   # a standard PEFT LoRA adapter (collapsed at on_train_end)

Events (``transformers.TrainerCallback`` documents what each receives):
- ``on_init_end``: the model is already the ``PeftModel``; the factors are installed here, before the
  Trainer builds its optimizer, so the cores train from step 0 with the LoRA weights' learning rate.
  Under ``prepass`` and ``dynamic`` every factor enters the bank here, plain ones as one core, and the bank is
  reserved at the most the budget can need: what the schedule moves later is slots of that one parameter,
  whose object and size never change (nothing for DDP's buckets or FSDP2's shards to follow).
- ``on_train_begin`` (prepass): score every module on a few batches (Fisher information) and move capacity.
- ``on_pre_optimizer_step`` (dynamic): fold this step's sensitivity ``sum |W * dL/dW|`` per module into
  the tracker. ``dL/dW`` is taken by a hook on each bank group's contraction, summed over micro-batches.
- ``on_step_end`` (dynamic): every ``interval`` steps between ``warmup_steps`` and the last
  ``final_steps``, choose modules by score within the budget; modules that leave go back to one core
  (exact), modules that enter are over-parameterized (exact); their Adam moments move with them or start
  anew in place.
- ``on_save``: ``checkpoint-N/`` gets ``lora_over.json`` (layouts) and ``lora_over_scheduler.json``
  (tracker, allocation history). On resume the Trainer loads the adapter before any callback event, so the
  callback wraps the model's ``load_adapter`` to rebuild the recorded layouts first.
- ``on_train_end``: collapse (``collapse_on_train_end``) and write ``lora_over_history.json``.

The decisions are :class:`~lora_over_trl.lora_over.schedule.scheduler.CapacityScheduler`'s, the measurements
:mod:`lora_over_trl.lora_over.sensitivity`'s; this module only carries them out on the model and its optimizer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from lora_over_trl.lora_over.checkpoint import (
    FSDP_MODEL_FILE,  # importable from here too, as before it moved
    LAYOUT_FILE,
    adopt_layouts,
    bank_tensors,
    check_resumable,
    keep_only_parameters,
    restore_layouts,
    write_bank_file,
    write_layout_file,
)
from lora_over_trl.lora_over.config import LoraOverConfig
from lora_over_trl.lora_over.model import (
    FACTOR_NAMES,
    apply_lora_over,
    banked_factors,
    banks,
    collapse,
    module_layouts,
    over_parameterized_factors,
    plain_layout,
    set_layouts,
)
from lora_over_trl.lora_over.schedule.picture import draw_allocation
from lora_over_trl.lora_over.schedule.scheduler import CapacityScheduler
from lora_over_trl.lora_over.sensitivity import SensitivityHooks, fisher_scores
from lora_over_trl.registry import METHODS, refusal
from lora_over_trl.utils.callbacks import ScheduleSetupError, restore_before_load
from lora_over_trl.utils.distributed import launch_mode
from lora_over_trl.utils.peft_layers import lora_modules

__all__ = ["LoraOverCallback"]

SCHEDULER_FILE = "lora_over_scheduler.json"
# Written into output_dir at the end of a run; the registry lists them, with what each holds, for the SFT command.
HISTORY_FILE, PICTURE_FILE = METHODS["lora_over"].output_files


class LoraOverCallback(TrainerCallback):
    """Install, schedule and collapse LoRA-Over factors inside a Trainer run.

    ``config``, ``model``, ``optimizer`` and ``layers`` are attributes; ``history``, ``budget``, ``phases``,
    ``current``, ``tracker``, ``costs`` and ``capacities`` are the :attr:`scheduler`'s.

    Args:
        config: the :class:`LoraOverConfig` (capacity, rules, schedule, budget ...).

    Raises:
        ScheduleSetupError: at ``on_init_end`` (no LoRA layers, rules matching nothing, a budget that holds no
            module or that static rules exceed, a schedule the run's FSDP/DeepSpeed cannot carry:
            :func:`lora_over_trl.registry.refusal`) or ``on_train_begin`` (warm-up beyond the run), before any
            training step.
    """

    def __init__(self, config: LoraOverConfig) -> None:
        self.config = config
        self.scheduler = CapacityScheduler(config)  # sized at on_init_end, once the model's modules are known
        self.hooks = SensitivityHooks(config.adapter_name)
        # run-time wiring
        self.model: nn.Module | None = None
        self.layers: dict[str, nn.Module] = {}
        self.aux_scale = 1.0
        self.shapes: dict[str, dict[str, tuple[int, int]]] = {}  # module -> {"A": shape, "B": shape}
        self.optimizer = None
        self._schedule_restored = False  # a checkpoint's scheduler state was read (resume)

    # ---- what other code reads: the scheduler's -----------------------------------------------------

    history = property(lambda self: self.scheduler.history, doc="The allocation history (``lora_over_history``).")
    budget = property(lambda self: self.scheduler.budget, doc="Auxiliary parameters allowed (None: no limit).")
    phases = property(lambda self: self.scheduler.phases, doc="Dynamic: (first step, interval, step it stops before).")
    tracker = property(lambda self: self.scheduler.tracker, doc="The smoothed sensitivity per module.")
    costs = property(lambda self: self.scheduler.costs, doc="Auxiliary parameters of each module at `capacity`.")
    capacities = property(lambda self: self.scheduler.capacities, doc="The capacities a module may hold, lowest first.")

    @property
    def current(self) -> dict[str, float]:
        """Capacity of each over-parameterized module now."""
        return self.scheduler.current

    @current.setter
    def current(self, value: dict[str, float]) -> None:
        self.scheduler.current = value

    # ---- events -------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        config = self.config
        refused = refusal("lora_over", config, launch_mode(args))
        if refused:  # before anything is installed: FSDP/DeepSpeed wrap the model after this event
            raise ScheduleSetupError(f"LoraOverCallback: {refused}")
        layers = lora_modules(model, config.adapter_name)
        if not layers:
            raise ScheduleSetupError(
                "LoraOverCallback: the model has no LoRA layers; pass peft_config=LoraConfig(...) to the trainer "
                "or a PeftModel as the model"
            )
        self.model, self.layers = model, layers  # the LoRA layers stay the same modules for the whole run
        lora_params = sum(
            layer.lora_A[config.adapter_name].weight.numel() + layer.lora_B[config.adapter_name].weight.numel()
            for layer in layers.values()
        )
        self.shapes = {
            name: {w: tuple(getattr(layer, attr)[config.adapter_name].weight.shape) for w, attr in FACTOR_NAMES.items()}
            for name, layer in layers.items()
        }
        planned = {name: [self._layouts(name, capacity) for capacity in self.capacities] for name in layers}
        level_costs = {
            name: [sum(x.aux_params() for x in level.values() if x) for level in levels]
            for name, levels in planned.items()
        }
        self.scheduler = CapacityScheduler(config, level_costs, lora_params)
        # The auxiliary cores' own learning rate, as a scale inside the factor (no extra optimizer group,
        # so checkpoints load into a fresh Trainer's optimizer): see lora_over_trl.lora_over.bank.
        self.aux_scale = config.aux_lr / args.learning_rate if config.aux_lr else 1.0
        if config.schedule == "static":
            report = apply_lora_over(model, config, aux_scale=self.aux_scale)
            if self.budget is not None and report.aux_params > self.budget:
                collapse(model)
                raise ScheduleSetupError(
                    f"LoraOverCallback: the static rules need {report.aux_params:,} auxiliary parameters, over the "
                    f"budget of {self.budget:,}; lower `capacity`/the rules' capacities or raise the budget"
                )
        else:  # every factor in the bank now, before DDP or FSDP2 wrap the model
            first = self.scheduler.initial() if config.schedule == "dynamic" else {}  # seeded: alike on every rank
            self._install(first)
            if config.schedule == "dynamic":
                self.hooks.observe(model)
                self._record(0, "initial")
        restore_before_load(model, self._restore)

    def _install(self, capacities: dict[str, float]) -> None:
        """Put every module's factors in the bank at ``capacities`` (plain, one core, where none), reserved."""
        targets = {}
        for name in sorted(self.layers):
            layouts = self._layouts(name, capacities.get(name, 0.0))
            targets.update({f"{name}.{FACTOR_NAMES[w]}": layout for w, layout in layouts.items()})
        set_layouts(self.model, targets, self.config, aux_scale=self.aux_scale, reserve=self.scheduler.reserve)
        self.model.lora_over_config = self.config
        self.current = dict(capacities)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        config = self.config
        self.scheduler.start(state.max_steps)
        self.optimizer = optimizer
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.global_step > 0 and not self._schedule_restored and (folder / SCHEDULER_FILE).is_file():
            # Under FSDP the Trainer resumes through accelerate's loader, not `load_adapter`, so the hook that
            # rebuilds the checkpoint's state never ran. The storage and its moments, just loaded, are laid out
            # as the checkpoint's plan; the bank takes that plan over (nothing moves), then the schedule's state:
            # without it every factor's Adam moments would be re-seeded at the next step as if new.
            adopt_layouts(self.model, folder)
            self._restore_schedule(folder)
        if config.schedule == "prepass" and state.global_step == 0:  # a resumed run got its layouts from disk
            scores = self._fisher(model, kwargs["train_dataloader"])
            self._move_capacity(self.scheduler.choose(scores), step=0, event="prepass")

    def _fisher(self, model: nn.Module, dataloader) -> dict[str, float]:
        """The pre-pass's scores: :func:`lora_over_trl.lora_over.sensitivity.fisher_scores`."""
        return fisher_scores(model, self.layers, self.config.adapter_name, dataloader, self.config.prepass_batches)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.optimizer is not None:
            for bank in banks(self.model, self.config.adapter_name).values():
                bank.seed_fresh_moments(self.optimizer)
        if self.config.schedule == "dynamic":
            measured = self.hooks.measure(self.model)
            if measured is not None:
                self.tracker.update(measured)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.scheduler.due(state.global_step):
            began = time.perf_counter()
            self._move_capacity(self.scheduler.choose(self.tracker.scores()), state.global_step, "reallocate")
            self.history[-1]["seconds"] = round(time.perf_counter() - began, 4)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not banked_factors(self.model, self.config.adapter_name):
            return
        tensors = bank_tensors(self.model)  # every rank: an FSDP-sharded storage is gathered
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        keep_only_parameters(self.model, folder / FSDP_MODEL_FILE)
        write_bank_file(tensors, folder)
        write_layout_file(self.model, folder)
        fresh = {part: bank.fresh for part, bank in banks(self.model, self.config.adapter_name).items()}
        (folder / SCHEDULER_FILE).write_text(json.dumps({**self.scheduler.state_dict(), "fresh": fresh}))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.config.collapse_on_train_end and banked_factors(self.model, self.config.adapter_name):
            # float32: a bfloat16 run (TRL's choice on 4-bit bases) would lose ~1e-3 of B A to rounding
            errors = collapse(self.model, dtype=torch.float32)
            self.scheduler.record_collapse(state.global_step, max(errors.values()))
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / HISTORY_FILE).write_text(json.dumps(self.history, indent=1))
            draw_allocation(self.history, Path(args.output_dir) / PICTURE_FILE)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Reporting integrations (TensorBoard, W&B) read the same dict; they see these keys when this callback
        # runs before them (the SFT command inserts it first; in a script: trainer.callback_handler.callbacks).
        if logs is not None:
            logs.update(self.scheduler.log_values())

    def run_summary(self) -> dict[str, Any]:
        """The run in a few numbers for the SFT command's summary.

        Returns:
            ``{"collapse_max_error": the final collapse's largest relative error or None, "lora_over": {schedule,
            budget, reallocations, phases (dynamic, else None), aux_params_last}}``.
        """
        collapses = [h for h in self.history if h.get("event") == "collapse"]
        return {
            "collapse_max_error": collapses[-1]["max_error"] if collapses else None,
            "lora_over": self.scheduler.summary(),
        }

    # ---- carrying decisions out ---------------------------------------------------------------------

    def _move_capacity(self, targets: dict[str, float], step: int, event: str) -> None:
        """Give each module its target capacity in one change of the bank: modules that leave go back to one core
        (exact), entering ones install (exact), modules changing level grow (exact) or shrink (SVD, error recorded).

        Only slots of the bank's storage change, in place: its parameter object and size stay (the reservation
        holds every allocation within the budget), its Adam moments move with the factors, and the moments of
        factors that changed layout start anew (seeded at the next step).
        """
        leaving, entering, changing = self.scheduler.plan(targets)
        layouts: dict[str, Any] = {}
        for name in leaving + entering + changing:
            chosen = self._layouts(name, targets.get(name, 0.0))
            layouts.update({f"{name}.{FACTOR_NAMES[w]}": layout for w, layout in chosen.items()})
        errors = set_layouts(self.model, layouts, self.config, optimizer=self.optimizer)
        self.current = dict(targets)
        resized = {n: max(errors.get(f"{n}.{a}", 0.0) for a in FACTOR_NAMES.values()) for n in changing}
        extra = {"resized": resized} if self.config.levels > 1 else {}
        self._record(step, event, leaving=leaving, entering=entering, **extra)

    def _record(self, step: int, event: str, **extra: Any) -> None:
        factors = over_parameterized_factors(self.model, self.config.adapter_name)
        modules = sorted({key.rsplit(".", 1)[0] for key in factors})
        self.scheduler.record(step, event, modules, sum(f.aux_params for f in factors.values()), **extra)

    def _layouts(self, name: str, capacity: float) -> dict[str, Any]:
        """``{"A": layout, "B": ...}`` of module ``name`` at ``capacity``: ``None`` where a static run leaves a factor
        plain, :func:`plain_layout` where a scheduled run keeps it plain in the bank."""
        chosen = module_layouts(self.shapes[name], capacity, self.config)
        if self.config.schedule == "static":
            return chosen
        return {w: layout or plain_layout(self.shapes[name][w]) for w, layout in chosen.items()}

    # ---- resume -------------------------------------------------------------------------------------

    def _restore(self, folder: Path) -> None:
        if (folder / LAYOUT_FILE).is_file():
            check_resumable(folder)
            restore_layouts(self.model, folder)
            self.hooks.observe(self.model)
            self._restore_schedule(folder)

    def _restore_schedule(self, folder: Path) -> None:
        """The scheduler's state of a checkpoint: tracker, history, and the storage whose moments are still to seed."""
        self._schedule_restored = True
        scheduler_file = folder / SCHEDULER_FILE
        if scheduler_file.is_file():
            state = json.loads(scheduler_file.read_text())
            self.scheduler.load_state_dict(state)
            for part, bank in banks(self.model, self.config.adapter_name).items():
                bank.fresh = [tuple(r) for r in state.get("fresh", {}).get(part, [])]  # moments still to seed
