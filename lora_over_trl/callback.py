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
  (:mod:`lora_over_trl.optim`).
- ``on_save``: ``checkpoint-N/`` gets ``lora_over.json`` (layouts) and ``lora_over_scheduler.json``
  (tracker, allocation history). On resume the Trainer loads the adapter before any callback event, so the
  callback wraps the model's ``load_adapter`` to rebuild the recorded layouts first.
- ``on_train_end``: collapse (``collapse_on_train_end``) and write ``lora_over_history.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .checkpoint import LAYOUT_FILE, read_layout_file, write_layout_file
from .config import LoraOverConfig
from .factor import MpoFactor
from .optim import group_index, sync_optimizer
from .patch import (
    FACTOR_NAMES,
    FACTOR_OF_ATTR,
    _mpo_factor,
    apply_lora_over,
    collapse,
    collapse_module,
    ensure_refresh_hook,
    install_layout,
    lora_modules,
    over_parameterize_module,
    over_parameterized_factors,
    remove_factor,
    resize_module,
)
from .schedule import SensitivityTracker, allocate, allocate_levels
from .schedule.picture import draw_allocation

__all__ = ["LoraOverCallback", "ScheduleSetupError", "restore_before_load"]

logger = logging.getLogger(__name__)
SCHEDULER_FILE = "lora_over_scheduler.json"
HISTORY_FILE = "lora_over_history.json"
PICTURE_FILE = "lora_over_allocation.png"


class ScheduleSetupError(ValueError):
    """A schedule that cannot run on this model or run (raised before any training step)."""


class LoraOverCallback(TrainerCallback):
    """Install, schedule and collapse LoRA-Over factors inside a Trainer run.

    Args:
        config: the :class:`LoraOverConfig` (capacity, rules, schedule, budget ...).

    Raises:
        ScheduleSetupError: at ``on_init_end`` (no LoRA layers, rules matching nothing, a budget that holds no
            module or that static rules exceed) or ``on_train_begin`` (warm-up beyond the run), before
            any training step.
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
        self.costs: dict[str, int] = {}  # auxiliary parameters of each module at `capacity`
        self.level_costs: dict[str, list[int]] = {}  # ... at each of the `levels` capacities
        self.current: dict[str, float] = {}  # capacity of each over-parameterized module now
        # factor -> [W, sum of dL/dW so far] during a step's micro-batches; sum |W * dL/dW| after its last one
        self._grads: dict[str, list[torch.Tensor] | torch.Tensor] = {}
        self._micro_batch, self._micro_batches = 0, 1

    # ---- events -------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        config = self.config
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
        if config.budget is not None or config.budget_ratio is not None:
            self.budget = config.budget if config.budget is not None else int(config.budget_ratio * lora_params)
        self.level_costs = {
            name: [self._cost(layer, capacity) for capacity in self.capacities] for name, layer in layers.items()
        }
        self.costs = {name: costs[-1] for name, costs in self.level_costs.items()}
        # The auxiliary cores' own learning rate, as a scale inside the factor (no extra optimizer group,
        # so checkpoints load into a fresh Trainer's optimizer): see MpoFactor.
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
                apply_lora_over(model, config, capacities=first, aux_scale=self.aux_scale)
                self.current = dict(first)
                self._observe_gradients(layers)
                self._record(0, "initial")
            else:
                model.lora_over_config = config  # the pre-pass installs at on_train_begin
        restore_before_load(model, self._restore)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        config = self.config
        if config.schedule == "dynamic":
            last = state.max_steps - config.final_steps
            if config.warmup_steps >= last:
                raise ScheduleSetupError(
                    f"LoraOverCallback: `warmup_steps`={config.warmup_steps} leaves no re-allocation before step "
                    f"{last} (max_steps {state.max_steps} - final_steps {config.final_steps})"
                )
        if config.schedule != "static" and args.world_size > 1 and not args.ddp_find_unused_parameters:
            # Modules that leave (or, after the pre-pass, the plain weights of chosen modules) keep parameters
            # DDP registered at wrap time but no longer train: DDP must be told some parameters may get no
            # gradient. Cores installed later are synchronized by hooks.
            raise ScheduleSetupError(
                f"LoraOverCallback: schedule={config.schedule!r} with {args.world_size} processes needs "
                "`ddp_find_unused_parameters=True` in the training arguments"
            )
        self.optimizer = optimizer
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
        if self.config.schedule != "dynamic" or not self._grads:
            return
        with torch.no_grad():
            keys = sorted(self._grads)
            sums = torch.stack([_sensitivity(self._grads[k]).cpu() for k in keys])
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
        if config.schedule != "dynamic" or step < config.warmup_steps or step >= state.max_steps - config.final_steps:
            return
        if (step - config.warmup_steps) % config.interval == 0:
            self._reallocate(step)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or not over_parameterized_factors(self.model, self.config.adapter_name):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        write_layout_file(self.model, folder)
        payload = {"tracker": self.tracker.state_dict(), "history": self.history}
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
        """Give each module its target capacity: others collapse (exact), new ones install (exact), and
        modules changing level grow (exact) or shrink (SVD truncation, error recorded)."""
        config, model, layers = self.config, self.model, self.layers
        current = self.current
        leaving = sorted(set(current) - set(targets))
        entering = sorted(set(targets) - set(current))
        changing = sorted(n for n in targets if n in current and targets[n] != current[n])
        placement: dict[int, int] = {}
        for name in leaving:
            self._collapse(name, placement)
        resized = {name: self._resize(name, targets[name], placement) for name in changing}
        for name in entering:
            self._install(name, targets[name], placement)
        self.current = dict(targets)
        if leaving or entering or changing:
            ensure_refresh_hook(model)
            sync_optimizer(self.optimizer, model, placement)
            _synchronize_new_parameters(layers, config.adapter_name, leaving + entering + changing)
            if config.schedule == "dynamic":
                self._observe_gradients(layers)
        extra = {"resized": resized} if config.levels > 1 else {}
        self._record(step, event, leaving=leaving, entering=entering, **extra)

    def _collapse(self, name: str, placement: dict[int, int]) -> None:
        layer = self.layers[name]
        groups = {w: self._group_of_factor(layer, w) for w in FACTOR_NAMES.values()}
        for attr in FACTOR_NAMES.values():  # free the leaving cores' Adam moments and gradients before any install
            factor = _mpo_factor(getattr(layer, attr)[self.config.adapter_name])
            for core in factor.cores if factor is not None else ():
                self._forget_state(core)
                core.grad = None
        collapse_module(layer, self.config.adapter_name)  # exact: the function is unchanged
        for attr, index in groups.items():
            weight = getattr(layer, attr)[self.config.adapter_name].weight
            self._forget_state(weight)  # its Adam moments predate the over-parameterization
            if index is not None:
                placement[id(weight)] = index

    def _install(self, name: str, capacity: float, placement: dict[int, int]) -> None:
        config, layer = self.config, self.layers[name]
        groups = {
            w: group_index(self.optimizer, getattr(layer, w)[config.adapter_name].weight) for w in FACTOR_NAMES.values()
        }
        over_parameterize_module(layer, name, capacity, config, aux_scale=self.aux_scale)
        for attr, index in groups.items():
            factor = _mpo_factor(getattr(layer, attr)[config.adapter_name])
            if factor is not None and index is not None:
                placement.update({id(core): index for core in factor.cores})

    def _resize(self, name: str, capacity: float, placement: dict[int, int]) -> float:
        """Move an over-parameterized module to another capacity; returns the relative error (0 when growing)."""
        config, layer = self.config, self.layers[name]
        plans, factors = {}, {}
        for which in ("A", "B"):
            linear = getattr(layer, FACTOR_NAMES[which])[config.adapter_name]
            factors[which] = _mpo_factor(linear)
            shape = factors[which].layout.shape if factors[which] is not None else tuple(linear.weight.shape)
            wanted = which in config.factor_keys()
            plan = MpoFactor.plan(shape, capacity, num_cores=config.num_cores, aux_core_size=config.aux_core_size)
            plans[which] = plan if wanted else None
        same_cores = all(
            (plans[w] is None) == (factors[w] is None)
            and (plans[w] is None or (plans[w].rows, plans[w].cols) == (factors[w].layout.rows, factors[w].layout.cols))
            for w in ("A", "B")
        )
        if not same_cores:  # another set of factors at this capacity: collapse and install anew, both exact
            self._collapse(name, placement)
            self._install(name, capacity, placement)
            return 0.0
        error = 0.0
        for which, factor in factors.items():
            if factor is None or plans[which].bonds == factor.layout.bonds:
                continue
            index = group_index(self.optimizer, factor.cores[0])
            for core in factor.cores:
                self._forget_state(core)
            error = max(error, resize_module(layer, name, which, plans[which].bonds, config))
            if index is not None:
                placement.update({id(core): index for core in factor.cores})
        return error

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

    def _cost(self, layer: nn.Module, capacity: float) -> int:
        total = 0
        for attr in (FACTOR_NAMES[which] for which in self.config.factor_keys()):
            weight = getattr(layer, attr)[self.config.adapter_name].weight
            layout = MpoFactor.plan(
                tuple(weight.shape), capacity, num_cores=self.config.num_cores, aux_core_size=self.config.aux_core_size
            )
            total += 0 if layout is None else layout.aux_params()
        return total

    def _group_of_factor(self, layer: nn.Module, attr: str) -> int | None:
        linear = getattr(layer, attr)[self.config.adapter_name]
        factor = _mpo_factor(linear)
        param = factor.cores[0] if factor is not None else linear.weight
        return group_index(self.optimizer, param)

    def _forget_state(self, param: nn.Parameter) -> None:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        inner.state.pop(param, None)

    def _observe_gradients(self, layers: dict[str, nn.Module]) -> None:
        """Hooks that sum dL/dW per factor over the micro-batches of a step (W: the factor's weight)."""
        for name, layer in layers.items():
            for attr in FACTOR_NAMES.values():
                key = f"{name}.{attr}"
                linear = getattr(layer, attr)[self.config.adapter_name]
                factor = _mpo_factor(linear)
                if factor is not None:
                    factor.grad_observer = functools.partial(_accumulate, self._grads, self._last_micro_batch, key)
                    param = linear.parametrizations.weight.original
                else:
                    param = linear.weight
                if param.requires_grad and not getattr(param, "_lora_over_observed", False):  # hook kept for good
                    param.register_hook(functools.partial(_accumulate, self._grads, self._last_micro_batch, key, param))
                    param._lora_over_observed = True


def _synchronize_new_parameters(layers: dict, adapter_name: str, names: list[str]) -> None:
    """Average the gradients of parameters that started training after DDP wrapped the model.

    DDP only reduces what was trainable when it wrapped the model; new cores and plain weights coming back
    from a collapse are averaged here, by a hook after each accumulation into ``.grad`` (backward order is the
    same on every rank; re-averaging an already averaged part, or a parameter DDP also reduces, changes nothing).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for name in names:
        for attr in FACTOR_NAMES.values():
            linear = getattr(layers[name], attr)[adapter_name]
            factor = _mpo_factor(linear)
            for param in factor.cores if factor is not None else [linear.weight]:
                if param.requires_grad and not getattr(param, "_lora_over_synchronized", False):
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


def restore_before_load(model: nn.Module, restore: Callable[[Path], None]) -> None:
    """Make ``model.load_adapter`` run ``restore(checkpoint folder)`` first.

    On resume the Trainer loads the checkpoint's adapter weights before any callback event: a callback that
    changed the adapter's structure (cores, windows) rebuilds the recorded one here, so the weights fit it.
    """
    original = model.load_adapter

    def load_adapter(model_id, adapter_name, *args, **kwargs):
        restore(Path(model_id))
        return original(model_id, adapter_name, *args, **kwargs)

    model.load_adapter = load_adapter


def _restore_layouts(callback: LoraOverCallback, folder: Path) -> None:
    config, model = callback.config, callback.model
    _, recorded = read_layout_file(folder)
    layers = callback.layers
    for name, layer in layers.items():
        for attr in FACTOR_NAMES.values():
            linear = getattr(layer, attr)[config.adapter_name]
            current = _mpo_factor(linear)
            layout, scale = recorded.get(f"{name}.{attr}", (None, 1.0))
            if current is not None and current.layout == layout and current.aux_scale == scale:
                continue
            remove_factor(linear)  # its values are about to be overwritten by the checkpoint anyway
            if layout is not None:
                install_layout(layer, FACTOR_OF_ATTR[attr], config.adapter_name, layout, scale)
    ensure_refresh_hook(model)
    callback._observe_gradients(layers)
    scheduler_file = folder / SCHEDULER_FILE
    if scheduler_file.is_file():
        state = json.loads(scheduler_file.read_text())
        callback.tracker.load_state_dict(state["tracker"])
        callback.history = state["history"]
        last = next((h for h in reversed(callback.history) if "modules" in h), None)
        if last is not None:  # the scheduled capacities, to move from at the next decision
            callback.current = last.get("capacities") or {name: callback.config.capacity for name in last["modules"]}
