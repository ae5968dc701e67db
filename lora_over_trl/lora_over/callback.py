"""LoRA-Over in any ``transformers.Trainer`` / TRL ``SFTTrainer`` script: one callback.

    trainer = SFTTrainer(..., peft_config=LoraConfig(...),
                         callbacks=[LoraOverCallback(LoraOverConfig(schedule="dynamic", budget_ratio=0.5))])
    trainer.train()
    trainer.save_model()   # a standard PEFT LoRA adapter (collapsed at on_train_end)

Events (STACK_NOTES lists what each receives):
- ``on_init_end``: the model is already the ``PeftModel``; the factors are installed here, before the
  Trainer builds its optimizer, so the cores train from step 0 with the LoRA weights' learning rate.
- ``on_pre_optimizer_step`` (dynamic): fold this step's sensitivity ``sum |W * dL/dW|`` per module into
  the tracker. ``dL/dW`` is taken by hooks on the factor weights, summed over micro-batches.
- ``on_step_end`` (dynamic): every ``interval`` steps between ``warmup_steps`` and the last
  ``final_steps``, choose modules by score within the budget; modules that leave are collapsed to plain
  LoRA (exact), modules that enter are over-parameterized (exact); the optimizer follows
  (:mod:`lora_over_trl.lora_over.optim`).
- ``on_save``: ``checkpoint-N/`` gets ``lora_over.json`` (layouts) and ``lora_over_scheduler.json``
  (tracker, allocation history). On resume the Trainer loads the adapter before any callback event, so the
  callback wraps the model's ``load_adapter`` to rebuild the recorded layouts first.
- ``on_train_end``: collapse (``collapse_on_train_end``) and write ``lora_over_history.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from lora_over_trl.lora_over.checkpoint import (
    LAYOUT_FILE,
    bank_tensors,
    check_resumable,
    restore_layouts,
    write_bank_file,
    write_layout_file,
)
from lora_over_trl.lora_over.config import LoraOverConfig
from lora_over_trl.lora_over.model import (
    FACTOR_NAMES,
    apply_lora_over,
    banks,
    collapse,
    factor_linears,
    lora_modules,
    module_layouts,
    over_parameterized_factors,
    set_layouts,
)
from lora_over_trl.lora_over.optim import group_index, sync_optimizer
from lora_over_trl.lora_over.schedule import SensitivityTracker, allocate, allocate_levels
from lora_over_trl.lora_over.schedule.picture import draw_allocation
from lora_over_trl.registry import refusal
from lora_over_trl.utils.callbacks import ScheduleSetupError, restore_before_load
from lora_over_trl.utils.distributed import launch_mode
from lora_over_trl.utils.fields import resolve_phase

__all__ = ["LoraOverCallback"]

logger = logging.getLogger(__name__)
DEFAULT_BUDGET_SHARE = 0.5  # prepass/dynamic without a budget: this share of every module's cost at `capacity`
SCHEDULER_FILE = "lora_over_scheduler.json"
HISTORY_FILE = "lora_over_history.json"
PICTURE_FILE = "lora_over_allocation.png"
FSDP_MODEL_FILE = "pytorch_model_fsdp.bin"  # accelerate's model file under FSDP with FULL_STATE_DICT


class LoraOverCallback(TrainerCallback):
    """Install, schedule and collapse LoRA-Over factors inside a Trainer run.

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
        # what the schedule knows
        self.tracker = SensitivityTracker(config.beta1, config.beta2, config.uncertainty)
        self.history: list[dict[str, Any]] = []
        # run-time wiring
        self.model: nn.Module | None = None
        self.layers: dict[str, nn.Module] = {}
        self.budget: int | None = None
        self.aux_scale = 1.0
        self.shapes: dict[str, dict[str, tuple[int, int]]] = {}  # module -> {"A": shape, "B": shape}
        self.costs: dict[str, int] = {}  # auxiliary parameters of each module at `capacity`
        self.level_costs: dict[str, list[int]] = {}  # ... at each of the `levels` capacities
        self.reserve = 0  # bank storage elements: the most any allocation within the budget needs
        self.current: dict[str, float] = {}  # capacity of each over-parameterized module now
        self.optimizer = None
        # plain factor -> [W, sum of dL/dW so far] during a step's micro-batches; sum |W * dL/dW| after its last
        self._grads: dict[str, list[torch.Tensor] | torch.Tensor] = {}
        # bank group (its factor keys) -> dL/dW of its contraction, summed over the step's backward passes
        self._group_grads: dict[tuple[str, ...], torch.Tensor] = {}
        self._micro_batch, self._micro_batches = 0, 1
        self.phases = (0, 1, 0)  # dynamic: (first step, interval, step it stops before), resolved at on_train_begin
        self._schedule_restored = False  # a checkpoint's scheduler state was read (resume)

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
        self.level_costs = {
            name: [sum(x.aux_params() for x in level.values() if x) for level in levels]
            for name, levels in planned.items()
        }
        self.costs = {name: costs[-1] for name, costs in self.level_costs.items()}
        if config.budget is not None or config.budget_ratio is not None:
            self.budget = config.budget if config.budget is not None else int(config.budget_ratio * lora_params)
        elif config.schedule != "static":  # the documented default (LoraOverConfig.budget): half of every module
            self.budget = max(1, int(DEFAULT_BUDGET_SHARE * sum(self.costs.values())))
            logger.info(
                "LoRA-Over %s schedule: no budget given; %d auxiliary parameters, half of what every module at "
                "capacity %g needs",
                config.schedule,
                self.budget,
                config.capacity,
            )
        if self.budget is not None and config.schedule == "dynamic":
            numel = {
                name: [sum(x.num_params() for x in level.values() if x) for level in levels]
                for name, levels in planned.items()
            }
            self.reserve = _bank_bound(numel, self.level_costs, self.budget)
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
        else:
            cheapest = min((c for costs in self.level_costs.values() for c in costs if c > 0), default=None)
            if cheapest is None or cheapest > self.budget:
                raise ScheduleSetupError(
                    f"LoraOverCallback: a budget of {self.budget:,} auxiliary parameters holds no module at capacity "
                    f"{self.capacities[0]:g} (the cheapest needs {cheapest or 0:,}); raise `budget`/`budget_ratio`"
                )
            if config.schedule == "dynamic":
                # No statistics yet: start from a seeded random choice (the same on every process).
                rng = random.Random(config.seed)
                first = self._choose({n: rng.random() for n in sorted(self.costs)})
                apply_lora_over(model, config, capacities=first, aux_scale=self.aux_scale, reserve=self.reserve)
                self.current = dict(first)
                self._observe_gradients()
                self._record(0, "initial")
            else:
                model.lora_over_config = config  # the pre-pass installs at on_train_begin
        restore_before_load(model, self._restore)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        config = self.config
        if config.schedule == "dynamic":
            self.phases = _resolve_phases(config, state.max_steps)
        if config.schedule != "static" and args.world_size > 1 and not args.ddp_find_unused_parameters:
            # Modules that leave (or, after the pre-pass, the plain weights of chosen modules) keep parameters
            # DDP registered at wrap time but no longer train: DDP must be told some parameters may get no
            # gradient. Cores installed later are synchronized by hooks.
            raise ScheduleSetupError(
                f"LoraOverCallback: schedule={config.schedule!r} with {args.world_size} processes needs "
                "`ddp_find_unused_parameters=True` in the training arguments"
            )
        self.optimizer = optimizer
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.global_step > 0 and not self._schedule_restored and (folder / SCHEDULER_FILE).is_file():
            # Under FSDP the Trainer resumes through accelerate's loader, not `load_adapter`, so the hook that
            # rebuilds the checkpoint's state never ran. The layouts are those of on_init_end (only static runs
            # there), but the schedule's state is not: without it every factor's Adam moments, just loaded, would
            # be re-seeded at the next step as if new.
            _restore_schedule(self, folder)
        if config.schedule == "prepass" and state.global_step == 0:  # a resumed run got its layouts from disk
            scores = self._fisher(model, kwargs["train_dataloader"])
            self._move_capacity(self._choose(scores), step=0, event="prepass")

    def _fisher(self, model: nn.Module, dataloader) -> dict[str, float]:
        """Mean over ``prepass_batches`` batches of the squared gradient of each module's LoRA weights.

        Gradients come from ``torch.autograd.grad``, not ``backward()``: nothing accumulates into ``.grad``,
        so DDP's gradient hooks (on the parameters themselves, wrapped or not) stay out of it.
        """
        layers = self.layers
        weights = {
            (name, attr): getattr(layer, attr)[self.config.adapter_name].weight
            for name, layer in layers.items()
            for attr in FACTOR_NAMES.values()
        }
        keys = [k for k, w in weights.items() if w.requires_grad]
        fisher = dict.fromkeys(layers, 0.0)
        model.train()
        batches = 0
        for batch in dataloader:
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")}
            loss = model(**inputs).loss
            grads = torch.autograd.grad(loss, [weights[k] for k in keys], allow_unused=True)
            for (name, _), grad in zip(keys, grads, strict=True):
                fisher[name] += 0.0 if grad is None else float((grad.float() ** 2).sum())
            batches += 1
            if batches == self.config.prepass_batches:
                break
        return _mean_over_processes({n: v / max(batches, 1) for n, v in fisher.items()})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.optimizer is not None:
            for bank in banks(self.model, self.config.adapter_name).values():
                bank.seed_fresh_moments(self.optimizer)
        if self.config.schedule != "dynamic" or not (self._grads or self._group_grads):
            return
        with torch.no_grad():
            per_factor = {k: _sensitivity(v) for k, v in self._grads.items()} | self._group_sensitivities()
            keys = sorted(per_factor)
            sums = torch.stack([per_factor[k].cpu() for k in keys])
        measured: dict[str, float] = {}
        for key, value in zip(keys, sums.tolist(), strict=True):
            name = key.rsplit(".", 1)[0]
            measured[name] = measured.get(name, 0.0) + value
        self._grads.clear()
        self.tracker.update(_mean_over_processes(measured))

    def on_step_begin(self, args, state, control, **kwargs):
        self._micro_batch, self._micro_batches = 0, args.gradient_accumulation_steps

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro_batch += 1  # the Trainer calls this after every micro-batch of a step but its last

    def _last_micro_batch(self) -> bool:
        return self._micro_batch >= self._micro_batches - 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        config = self.config
        step = state.global_step
        if config.schedule != "dynamic":
            return
        warmup, interval, last = self.phases
        if warmup <= step < last and (step - warmup) % interval == 0:
            self._reallocate(step)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not over_parameterized_factors(self.model, self.config.adapter_name):
            return
        tensors = bank_tensors(self.model)  # every rank: an FSDP-sharded storage is gathered
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        _keep_only_parameters(self.model, folder / FSDP_MODEL_FILE)
        write_bank_file(tensors, folder)
        write_layout_file(self.model, folder)
        fresh = {part: bank.fresh for part, bank in banks(self.model, self.config.adapter_name).items()}
        payload = {"tracker": self.tracker.state_dict(), "history": self.history, "fresh": fresh}
        (folder / SCHEDULER_FILE).write_text(json.dumps(payload))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.config.collapse_on_train_end and over_parameterized_factors(self.model, self.config.adapter_name):
            # float32: a bfloat16 run (TRL's choice on 4-bit bases) would lose ~1e-3 of B A to rounding
            errors = collapse(self.model, dtype=torch.float32)
            self.history.append({"step": state.global_step, "event": "collapse", "max_error": max(errors.values())})
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / HISTORY_FILE).write_text(json.dumps(self.history, indent=1))
            draw_allocation(self.history, Path(args.output_dir) / PICTURE_FILE)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Reporting integrations (TensorBoard, W&B) read the same dict; they see these keys when this callback
        # runs before them (the SFT command inserts it first; in a script: trainer.callback_handler.callbacks).
        if logs is not None and self.history and self.config.schedule != "static":
            last = self.history[-1]
            logs["lora_over/aux_params"] = last.get("aux_params", 0)
            logs["lora_over/modules"] = len(last.get("modules", []))
            logs["lora_over/moved"] = len(last.get("leaving", [])) + len(last.get("entering", []))
            if last.get("resized"):
                logs["lora_over/resized"] = len(last["resized"])
                logs["lora_over/shrink_error"] = max(last["resized"].values())

    def _restore(self, folder: Path) -> None:
        if (folder / LAYOUT_FILE).is_file():
            _restore_layouts(self, folder)

    # ---- the dynamic schedule -----------------------------------------------------------------------

    def _reallocate(self, step: int) -> None:
        began = time.perf_counter()
        self._move_capacity(self._choose(self.tracker.scores()), step, "reallocate")
        self.history[-1]["seconds"] = round(time.perf_counter() - began, 4)

    @property
    def capacities(self) -> list[float]:
        """The capacities a scheduled module may hold, lowest first (``levels`` of them)."""
        levels = self.config.levels
        return [self.config.capacity * k / levels for k in range(1, levels + 1)]

    def _choose(self, scores: dict[str, float]) -> dict[str, float]:
        """Capacity per module to over-parameterize, within the budget."""
        config = self.config
        if config.levels == 1:
            return {name: config.capacity for name in allocate(scores, self.costs, self.budget, config.scope)}
        chosen = allocate_levels(scores, self.level_costs, self.budget, config.scope)
        return {name: self.capacities[level - 1] for name, level in chosen.items()}

    def _move_capacity(self, targets: dict[str, float], step: int, event: str) -> None:
        """Give each module its target capacity in one change of the bank: modules that leave collapse (exact),
        entering ones install (exact), modules changing level grow (exact) or shrink (SVD, error recorded).

        The bank's storage stays the same parameter; its Adam moments move with the factors (new ones start at
        zero). Plain weights that come back are new parameters and join the LoRA weights' optimizer group.
        """
        config, model = self.config, self.model
        current = self.current
        leaving = sorted(set(current) - set(targets))
        entering = sorted(set(targets) - set(current))
        changing = sorted(n for n in targets if n in current and targets[n] != current[n])
        layouts: dict[str, Any] = {}
        for name in leaving + entering + changing:
            chosen = self._layouts(name, targets.get(name, 0.0))
            layouts.update({f"{name}.{FACTOR_NAMES[w]}": layout for w, layout in chosen.items()})
        group = self._lora_group()
        errors = set_layouts(
            model, layouts, config, aux_scale=self.aux_scale, optimizer=self.optimizer, reserve=self.reserve
        )
        self.current = dict(targets)
        if leaving or entering or changing:
            known = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            new = [p for p in model.parameters() if p.requires_grad and id(p) not in known]
            sync_optimizer(self.optimizer, model, dict.fromkeys(map(id, new), group))
            _synchronize_new_parameters(new)
            if config.schedule == "dynamic":
                self._observe_gradients()
        resized = {n: max(errors.get(f"{n}.{a}", 0.0) for a in FACTOR_NAMES.values()) for n in changing}
        extra = {"resized": resized} if config.levels > 1 else {}
        self._record(step, event, leaving=leaving, entering=entering, **extra)

    def _record(self, step: int, event: str, **extra: Any) -> None:
        factors = over_parameterized_factors(self.model, self.config.adapter_name)
        modules = sorted({key.rsplit(".", 1)[0] for key in factors})
        aux = sum(f.aux_params for f in factors.values())
        entry = {"step": step, "event": event, "modules": modules, "aux_params": aux, "budget": self.budget, **extra}
        if self.config.levels > 1:
            entry["capacities"] = {name: self.current[name] for name in modules}
        self.history.append(entry)
        logger.info(
            "LoRA-Over %s at step %d: %d modules, %d auxiliary params (budget %s)%s",
            event,
            step,
            len(modules),
            aux,
            self.budget,
            f", -{len(extra.get('leaving', []))} +{len(extra.get('entering', []))}" if extra else "",
        )

    # ---- helpers ------------------------------------------------------------------------------------

    def _layouts(self, name: str, capacity: float) -> dict[str, Any]:
        """``{"A": layout or None, "B": ...}`` of module ``name`` at ``capacity``."""
        return module_layouts(self.shapes[name], capacity, self.config)

    def _lora_group(self) -> int:
        """The optimizer group of the LoRA weights (and of the bank): where parameters that appear go."""
        candidates = [b.storage for b in banks(self.model, self.config.adapter_name).values()]
        candidates += [linear.weight for linear in factor_linears(self.model, self.config.adapter_name).values()]
        for param in candidates:
            index = group_index(self.optimizer, param)
            if index is not None:
                return index
        return 0

    def _observe_gradients(self) -> None:
        """Sum dL/dW per factor over the micro-batches of a step: hooks on plain weights (a scalar per factor
        once the step's last micro-batch is in) and one hook per bank group on its contraction (summed there,
        reduced to a scalar per factor at ``on_pre_optimizer_step``)."""
        adapter = self.config.adapter_name
        for bank in banks(self.model, adapter).values():
            bank.grad_observer = self._observe_group
        banked = {key for bank in banks(self.model, adapter).values() for key in bank.layouts}
        for key, linear in factor_linears(self.model, adapter).items():
            if key in banked:
                continue
            param = linear.weight
            if param.requires_grad and not getattr(param, "_lora_over_observed", False):  # hook kept for good
                param.register_hook(functools.partial(_accumulate, self._grads, self._last_micro_batch, key, param))
                param._lora_over_observed = True

    def _observe_group(self, keys: list[str], grad: torch.Tensor) -> None:
        group = tuple(keys)
        held = self._group_grads.get(group)
        self._group_grads[group] = grad.detach().clone() if held is None else held.add_(grad.detach())

    def _group_sensitivities(self) -> dict[str, torch.Tensor]:
        """``sum |W * dL/dW|`` of every banked factor, from the summed gradients of its group's contraction."""
        found: dict[str, torch.Tensor] = {}
        current = {key: bank for bank in banks(self.model, self.config.adapter_name).values() for key in bank.layouts}
        for keys, grad in self._group_grads.items():
            if not all(key in current for key in keys):
                continue
            weights = current[keys[0]].contract_group(keys)
            found.update(zip(keys, (weights * grad).abs().sum((1, 2)).float().unbind(0), strict=True))
        self._group_grads.clear()
        return found


def _keep_only_parameters(model: nn.Module, path: Path) -> None:
    """Drop the banked factors' weights from accelerate's FSDP model file (``FULL_STATE_DICT``), keeping the rest.

    A banked factor's ``weight`` is no parameter (the bank's storage, saved in the same file, defines it), yet its
    ``state_dict`` entry is there so that the adapter file is a standard one. FSDP2's resume broadcasts the file
    into the model's own parameters and fails on a key it has none for. Under PEFT the file holds the adapter only.
    """
    if not path.is_file():  # not an FSDP run, or a sharded state dict (a folder)
        return
    saved = torch.load(path, map_location="cpu", weights_only=True)
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    kept = {key: value for key, value in saved.items() if key in names}
    if len(kept) < len(saved):
        staging = path.with_name(f".{path.name}.tmp")
        torch.save(kept, staging)
        staging.replace(path)


def _resolve_phases(config: LoraOverConfig, max_steps: int) -> tuple[int, int, int]:
    """``(warmup, interval, last)`` in steps for a run of ``max_steps``: re-allocate at ``warmup + k interval < last``.

    Raises:
        ScheduleSetupError: absolute phases that leave no step to re-allocate in this run.
    """
    warmup = resolve_phase(config.warmup_steps, max_steps)
    interval = resolve_phase(config.interval, max_steps, minimum=1)
    final = resolve_phase(config.final_steps, max_steps)
    last = max_steps - final
    if warmup >= last:
        raise ScheduleSetupError(
            f"LoraOverCallback: `warmup_steps`={config.warmup_steps} leaves no re-allocation before step {last} "
            f"(max_steps {max_steps} - final_steps {config.final_steps}); give the phases as fractions of the run "
            "(e.g. warmup_steps: 0.1, final_steps: 0.2) to fit any run length"
        )
    logger.info(
        "LoRA-Over dynamic schedule: re-allocate every %d steps from step %d to step %d of %d (interval %s, "
        "warmup_steps %s, final_steps %s)",
        interval,
        warmup,
        last - 1,
        max_steps,
        config.interval,
        config.warmup_steps,
        config.final_steps,
    )
    return warmup, interval, last


def _bank_bound(numel: dict[str, list[int]], aux: dict[str, list[int]], budget: int) -> int:
    """The most storage elements any allocation within ``budget`` auxiliary parameters can need.

    A fractional knapsack over every (module, level), best elements-per-auxiliary-parameter first, bounds
    every allocation the schedule can choose (each holds at most one level per module, within the budget).
    """
    items = sorted(
        ((numel[n][i], aux[n][i]) for n in numel for i in range(len(numel[n])) if aux[n][i] > 0),
        key=lambda item: item[0] / item[1],
        reverse=True,
    )
    bound, left = 0.0, float(budget)
    for elements, cost in items:
        if left <= 0:
            break
        bound += elements * min(1.0, left / cost)
        left -= cost
    most = sum(max(counts) for counts in numel.values())
    return int(min(math.ceil(bound), most))


def _synchronize_new_parameters(params: list[nn.Parameter]) -> None:
    """Average the gradients of parameters that started training after DDP wrapped the model.

    DDP only reduces what was trainable when it wrapped the model; a bank created later (the pre-pass) and
    plain weights coming back from a collapse are averaged here, by a hook after each accumulation into
    ``.grad`` (backward order is the same on every rank).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for param in params:
        if not getattr(param, "_lora_over_synchronized", False):
            param.register_post_accumulate_grad_hook(_average_gradient)
            param._lora_over_synchronized = True


def _average_gradient(param: nn.Parameter) -> None:
    torch.distributed.all_reduce(param.grad)
    param.grad /= torch.distributed.get_world_size()


def _mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """The same statistics on every process (all-reduced mean), so every rank makes the same decision."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    names = sorted(values)
    tensor = torch.tensor([values[n] for n in names], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.all_reduce(tensor)
    tensor /= torch.distributed.get_world_size()
    return dict(zip(names, tensor.cpu().tolist(), strict=True))


def _accumulate(
    store: dict[str, list[torch.Tensor] | torch.Tensor],
    last_micro_batch: Callable[[], bool],
    key: str,
    weight: torch.Tensor,
    grad: torch.Tensor,
) -> None:
    """Fold one micro-batch's dL/dW into ``store[key]``. W is the same in every micro-batch of a step, so only the
    gradients are summed; at the step's last micro-batch the statistic is reduced to a scalar at once, so no
    weight-sized tensor outlives the backward pass (none is kept at all without gradient accumulation)."""
    held = store.get(key)
    if isinstance(held, list):
        held[1] = held[1] + grad.detach()
        if last_micro_batch():
            store[key] = _sensitivity(held)
    elif last_micro_batch():
        store[key] = (held if held is not None else 0) + _sensitivity([weight, grad])
    else:
        store[key] = [weight.detach(), grad.detach().clone()]


def _sensitivity(held: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """``sum |W * dL/dW|`` as a float32 scalar (already reduced: returned as it is)."""
    if isinstance(held, torch.Tensor):
        return held
    weight, grad = held
    return (weight.detach() * grad.detach()).abs().sum().float()


def _restore_layouts(callback: LoraOverCallback, folder: Path) -> None:
    check_resumable(folder)
    restore_layouts(callback.model, folder)
    callback._observe_gradients()
    _restore_schedule(callback, folder)


def _restore_schedule(callback: LoraOverCallback, folder: Path) -> None:
    """The scheduler's state of a checkpoint: tracker, history, and the storage whose moments are still to seed."""
    callback._schedule_restored = True
    scheduler_file = folder / SCHEDULER_FILE
    if scheduler_file.is_file():
        state = json.loads(scheduler_file.read_text())
        callback.tracker.load_state_dict(state["tracker"])
        callback.history = state["history"]
        for part, bank in banks(callback.model, callback.config.adapter_name).items():
            bank.fresh = [tuple(r) for r in state.get("fresh", {}).get(part, [])]  # moments still to seed
        last = next((h for h in reversed(callback.history) if "modules" in h), None)
        if last is not None:  # the scheduled capacities, to move from at the next decision
            callback.current = last.get("capacities") or {name: callback.config.capacity for name in last["modules"]}
