"""The capacity schedule as a state machine, with no Trainer and no model: plain numbers in, decisions out.

:class:`CapacityScheduler` knows what each module costs at each capacity level, the budget, and the bank storage
to reserve; it keeps the sensitivity tracker, the current allocation and the history. It decides the seeded
first allocation (:meth:`~CapacityScheduler.initial`), an allocation from scores (:meth:`~CapacityScheduler.choose`),
the steps at which to re-allocate (:meth:`~CapacityScheduler.due`) and which modules a new allocation moves
(:meth:`~CapacityScheduler.plan`). :class:`lora_over_trl.lora_over.callback.LoraOverCallback` carries the decisions
out on the model; :meth:`~CapacityScheduler.state_dict` is the ``lora_over_scheduler.json`` a checkpoint keeps.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from lora_over_trl.lora_over.config import LoraOverConfig
from lora_over_trl.lora_over.schedule.allocate import allocate, allocate_levels
from lora_over_trl.lora_over.schedule.importance import SensitivityTracker
from lora_over_trl.utils.callbacks import ScheduleSetupError
from lora_over_trl.utils.fields import resolve_phase

__all__ = ["DEFAULT_BUDGET_SHARE", "CapacityScheduler", "resolve_phases"]

# The run's log lines keep the name they were always logged under (the SFT command prints it; filters use it).
logger = logging.getLogger("lora_over_trl.lora_over.callback")
DEFAULT_BUDGET_SHARE = 0.5  # prepass/dynamic without a budget: this share of every module's cost at `capacity`


class CapacityScheduler:
    """Budget, costs, phases, tracker, allocation and history of one LoRA-Over run.

    Args:
        config: the run's :class:`LoraOverConfig` (schedule, capacity, levels, budget, phases, scope, seed ...).
        level_costs: auxiliary parameters of each module at each of the ``levels`` capacities (lowest first;
            0 where the module stays plain at that capacity). ``None``: not sized yet, nothing known of the model
            (no budget, no reserve); a callback before ``on_init_end`` holds such a scheduler.
        lora_params: the LoRA weights' element count, the base of ``budget_ratio`` (and of :attr:`reserve`).

    Raises:
        ScheduleSetupError: a prepass or dynamic schedule whose budget holds no module at its lowest capacity.
    """

    def __init__(
        self,
        config: LoraOverConfig,
        level_costs: dict[str, list[int]] | None = None,
        lora_params: int = 0,
    ) -> None:
        self.config = config
        self.tracker = SensitivityTracker(config.beta1, config.beta2, config.uncertainty)
        self.history: list[dict[str, Any]] = []
        self.level_costs = dict(level_costs or {})  # ... at each of the `levels` capacities
        self.costs = {name: costs[-1] for name, costs in self.level_costs.items()}  # auxiliary params at `capacity`
        self.budget: int | None = None
        # prepass/dynamic: bank storage elements, the most any allocation within the budget needs. Every factor is in
        # the bank (plain ones as one core, p q elements) and a layout holds p q + its auxiliary parameters, so that
        # is the LoRA weights plus the budget (or every module at its largest level, when that is less).
        self.reserve = 0
        self.current: dict[str, float] = {}  # capacity of each over-parameterized module now
        self.phases = (0, 1, 0)  # dynamic: (first step, interval, step it stops before), see `start`
        if level_costs is None:
            return
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
        if self.budget is not None and config.schedule != "static":
            self.reserve = lora_params + min(self.budget, sum(max(costs) for costs in self.level_costs.values()))
        if config.schedule != "static":
            cheapest = min((c for costs in self.level_costs.values() for c in costs if c > 0), default=None)
            if cheapest is None or cheapest > self.budget:
                raise ScheduleSetupError(
                    f"LoraOverCallback: a budget of {self.budget:,} auxiliary parameters holds no module at capacity "
                    f"{self.capacities[0]:g} (the cheapest needs {cheapest or 0:,}); raise `budget`/`budget_ratio`"
                )

    @property
    def capacities(self) -> list[float]:
        """The capacities a scheduled module may hold, lowest first (``levels`` of them)."""
        levels = self.config.levels
        return [self.config.capacity * k / levels for k in range(1, levels + 1)]

    # ---- decisions ----------------------------------------------------------------------------------

    def initial(self) -> dict[str, float]:
        """The dynamic schedule's first allocation: no statistics yet, so a seeded random choice (the same on
        every process and in every run with the config's ``seed``)."""
        rng = random.Random(self.config.seed)
        return self.choose({n: rng.random() for n in sorted(self.costs)})

    def choose(self, scores: dict[str, float]) -> dict[str, float]:
        """Capacity per module to over-parameterize, within the budget.

        Args:
            scores: a score per module (higher: more deserving of capacity).

        Returns:
            ``{module: capacity}`` for the chosen modules (one of :attr:`capacities` each).
        """
        config = self.config
        if config.levels == 1:
            return {name: config.capacity for name in allocate(scores, self.costs, self.budget, config.scope)}
        chosen = allocate_levels(scores, self.level_costs, self.budget, config.scope)
        return {name: self.capacities[level - 1] for name, level in chosen.items()}

    def start(self, max_steps: int) -> None:
        """Resolve the dynamic schedule's phases for a run of ``max_steps`` steps (other schedules: nothing).

        Raises:
            ScheduleSetupError: phases that leave no step to re-allocate in this run.
        """
        if self.config.schedule == "dynamic":
            self.phases = resolve_phases(self.config, max_steps)

    def due(self, step: int) -> bool:
        """Whether the dynamic schedule re-allocates at the end of optimizer step ``step``."""
        if self.config.schedule != "dynamic":
            return False
        warmup, interval, last = self.phases
        return warmup <= step < last and (step - warmup) % interval == 0

    def plan(self, targets: dict[str, float]) -> tuple[list[str], list[str], list[str]]:
        """What moving from :attr:`current` to ``targets`` changes.

        Returns:
            ``(leaving, entering, changing)``, each sorted: modules that lose their capacity, modules that gain
            one, and modules kept at another capacity.
        """
        current = self.current
        leaving = sorted(set(current) - set(targets))
        entering = sorted(set(targets) - set(current))
        changing = sorted(n for n in targets if n in current and targets[n] != current[n])
        return leaving, entering, changing

    # ---- history ------------------------------------------------------------------------------------

    def record(self, step: int, event: str, modules: list[str], aux_params: int, **extra: Any) -> dict[str, Any]:
        """Append (and log) a history entry: the over-parameterized ``modules`` and their ``aux_params`` after
        ``event`` at ``step``; ``extra`` (``leaving``, ``entering``, ``resized``) is kept as given.

        Returns:
            The entry appended.
        """
        entry = {"step": step, "event": event, "modules": modules, "aux_params": aux_params, "budget": self.budget}
        entry.update(extra)
        if self.config.levels > 1:
            entry["capacities"] = {name: self.current[name] for name in modules}
        self.history.append(entry)
        logger.info(
            "LoRA-Over %s at step %d: %d modules, %d auxiliary params (budget %s)%s",
            event,
            step,
            len(modules),
            aux_params,
            self.budget,
            f", -{len(extra.get('leaving', []))} +{len(extra.get('entering', []))}" if extra else "",
        )
        return entry

    def record_collapse(self, step: int, max_error: float) -> None:
        """Append the final collapse to plain LoRA and its largest relative error."""
        self.history.append({"step": step, "event": "collapse", "max_error": max_error})

    def log_values(self) -> dict[str, Any]:
        """What the latest history entry adds to the Trainer's logs (nothing for a static schedule)."""
        if not self.history or self.config.schedule == "static":
            return {}
        last = self.history[-1]
        values = {
            "lora_over/aux_params": last.get("aux_params", 0),
            "lora_over/modules": len(last.get("modules", [])),
            "lora_over/moved": len(last.get("leaving", [])) + len(last.get("entering", [])),
        }
        if last.get("resized"):
            values["lora_over/resized"] = len(last["resized"])
            values["lora_over/shrink_error"] = max(last["resized"].values())
        return values

    def summary(self) -> dict[str, Any]:
        """The run in a few numbers: schedule, budget, re-allocations, phases (dynamic) and the last auxiliary
        parameter count."""
        history = self.history
        return {
            "schedule": self.config.schedule,
            "budget": self.budget,
            "reallocations": sum(h.get("event") == "reallocate" for h in history),
            "phases": dict(zip(("warmup", "interval", "last"), self.phases, strict=True))
            if self.config.schedule == "dynamic"
            else None,
            "aux_params_last": next((h["aux_params"] for h in reversed(history) if "aux_params" in h), 0),
        }

    # ---- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"tracker": ..., "history": ...}``, JSON-serializable (a checkpoint's ``lora_over_scheduler.json``,
        to which the callback adds the banks' ``fresh`` ranges)."""
        return {"tracker": self.tracker.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state: tracker, history and the scheduled capacities (those of the last
        entry that lists modules), to move from at the next decision. Other keys are ignored."""
        self.tracker.load_state_dict(state["tracker"])
        self.history = state["history"]
        last = next((h for h in reversed(self.history) if "modules" in h), None)
        if last is not None:
            self.current = last.get("capacities") or {name: self.config.capacity for name in last["modules"]}


def resolve_phases(config: LoraOverConfig, max_steps: int) -> tuple[int, int, int]:
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
