"""What the user asks of LoRA-Over: which modules are over-parameterized, by how much, and how it is scheduled."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lora_over_trl.utils.fields import from_dict, is_fraction, is_number, layer_index, module_matches, phase_problems

__all__ = ["CapacityRule", "LoraOverConfig"]

_FACTORS = ("both", "A", "B")
_SCHEDULES = ("static", "prepass", "dynamic")
_SCOPES = ("global", "per_type")


@dataclass
class CapacityRule:
    """Capacity for the LoRA modules a rule selects; the first matching rule in a list wins.

    Args:
        target_modules: module names as in PEFT's ``LoraConfig.target_modules`` (a list matches name
            suffixes such as ``"q_proj"``; a string is a regex over the whole name).
        capacity: over-parameterization ratio of the selected modules (see :class:`LoraOverConfig`).
        layers: optional inclusive range ``[first, last]`` of layer indices the rule is limited to.
    """

    target_modules: str | list[str]
    capacity: float
    layers: list[int] | None = None

    def problems(self, where: str) -> list[str]:
        found = []
        if not self.target_modules:
            found.append(f"`{where}.target_modules` is empty: name at least one module")
        if not isinstance(self.capacity, (int, float)) or self.capacity < 0:
            found.append(f"`{where}.capacity` must be a number >= 0, got {self.capacity!r}")
        if self.layers is not None and (
            len(self.layers) != 2
            or not all(isinstance(i, int) and i >= 0 for i in self.layers)
            or self.layers[0] > self.layers[1]
        ):
            found.append(f"`{where}.layers` must be [first, last] with 0 <= first <= last, got {self.layers!r}")
        return found

    def selects(self, name: str) -> bool:
        if not module_matches(name, self.target_modules):
            return False
        if self.layers is None:
            return True
        index = layer_index(name)
        return index is not None and self.layers[0] <= index <= self.layers[1]


@dataclass
class LoraOverConfig:
    """LoRA-Over settings: over-parameterize LoRA factors as MPO (tensor-train) cores during training.

    The *capacity* of a module is its over-parameterization ratio: auxiliary parameters (core parameters
    beyond those of the plain factors) per LoRA parameter. ``capacity=1.0`` roughly doubles the module's
    trainable parameters; ``0`` keeps it plain LoRA. Bonds are chosen as large as the capacity allows; a
    factor whose capacity cannot hold the exact layout stays plain.

    Args:
        capacity: capacity of every LoRA module no rule selects.
        rules: per-module capacities (:class:`CapacityRule` or dicts with its fields); first match wins.
        target_modules: restrict over-parameterization to these LoRA modules (PEFT's matching rule);
            ``None`` means every LoRA module.
        factors: which LoRA factors to over-parameterize: ``"both"``, ``"A"`` or ``"B"``.
        num_cores: cores per factor (one central core plus ``num_cores - 1`` auxiliary cores).
        aux_core_size: bound on the product of ``p_j * q_j`` over the auxiliary cores on each side of the
            central core (their exact bonds grow with it).
        aux_lr: learning rate of the auxiliary cores (OPF trains them apart); ``None`` uses the main one.
            ``LoraOverCallback`` realizes it inside the factor (``aux_scale = aux_lr / learning_rate``, exact
            under Adam-family optimizers, no extra optimizer group); own training loops pass
            ``apply_lora_over(model, config, aux_scale=aux_lr / lr)``.
        init_std: scale of the random half of padded bond slots; ``None`` uses ``1 / sqrt(fan_in)``.
        seed: seed of that random initialization (the same seed gives the same cores).
        adapter_name: the PEFT adapter to over-parameterize.
        schedule: ``"static"`` (capacities from ``capacity`` and ``rules``, fixed), ``"prepass"`` (before
            training, ``prepass_batches`` batches score each module by Fisher information, the mean squared
            gradient of its LoRA weights, as OPF did; the top modules within the budget get ``capacity``,
            fixed) or ``"dynamic"`` (modules re-chosen during training by gradient sensitivity).
        prepass_batches: batches of the importance pre-pass.
        levels: prepass/dynamic: the capacities a scheduled module may hold, ``capacity * k / levels`` for
            ``k = 1 .. levels``. With 1 a module is in (at ``capacity``) or out; with more, the budget is
            shared in proportion to importance and modules move between levels (growing pads bonds, exact;
            shrinking truncates by SVD, its error logged).
        budget: most auxiliary parameters in total (never exceeded); or
        budget_ratio: the same as a fraction of the LoRA parameters. Neither: no limit for ``static``; for
            ``prepass`` and ``dynamic`` half of what every module at ``capacity`` would need, so that half of
            the modules can be over-parameterized and the schedule has a real choice to make (with the whole
            cost every module fits and the schedule is static; OPF and AdaLoRA also keep a minority-to-half
            share of their candidates).
        scope: ``"global"`` ranks all modules together; ``"per_type"`` splits the budget by module type
            (``q_proj``, ``v_proj`` ...) in proportion to their cost, as OPF picked matrices per type.
        interval: dynamic: re-allocate every this many optimizer steps ...
        warmup_steps: ... from this step on (importance needs a few steps to settle) ...
        final_steps: ... and not in the last this many steps (the allocation freezes).
            Each of the three is an integer (optimizer steps) or a float below 1: a fraction of the run's
            ``max_steps``, resolved when training starts (as ``warmup_steps`` in transformers 5), so a recipe
            fits any run length. The defaults are fractions: 10% warm-up (the sensitivity EMA, ``beta1=0.85``,
            needs about ten updates to forget its start), a re-allocation every 5% (at most ~14 in a run, each
            about one step's cost), and the last 20% frozen (the final choice trains on, as AdaLoRA's
            ``tfinal``).
        beta1, beta2: dynamic: EMA factors of the sensitivity and of its uncertainty (AdaLoRA's symbols).
        uncertainty: score = EMA sensitivity x EMA uncertainty (AdaLoRA) instead of the sensitivity alone.
        collapse_on_train_end: the callback collapses at ``on_train_end``, so ``trainer.save_model()``
            writes a standard PEFT adapter.

    Raises:
        ValueError: listing every invalid field at once.

    Example:
        >>> LoraOverConfig(capacity=0.5, rules=[{"target_modules": ["v_proj"], "capacity": 2.0}])
    """

    capacity: float = 1.0
    rules: list[CapacityRule] = field(default_factory=list)
    target_modules: str | list[str] | None = None
    factors: str = "both"
    num_cores: int = 2
    aux_core_size: int = 16
    aux_lr: float | None = None
    init_std: float | None = None
    seed: int = 0
    adapter_name: str = "default"
    schedule: str = "static"
    prepass_batches: int = 8
    levels: int = 1
    budget: int | None = None
    budget_ratio: float | None = None
    scope: str = "global"
    interval: int | float = 0.05
    warmup_steps: int | float = 0.1
    final_steps: int | float = 0.2
    beta1: float = 0.85
    beta2: float = 0.85
    uncertainty: bool = True
    collapse_on_train_end: bool = True

    def __post_init__(self) -> None:
        problems = []
        rules = []
        for i, rule in enumerate(self.rules or []):
            if isinstance(rule, dict):
                try:
                    rule = CapacityRule(**rule)
                except TypeError as err:
                    problems.append(f"`rules[{i}]`: {err} (fields: target_modules, capacity, layers)")
                    continue
            problems += rule.problems(f"rules[{i}]")
            rules.append(rule)
        self.rules = rules
        if not is_number(self.capacity) or self.capacity < 0:
            problems.append(f"`capacity` must be a number >= 0, got {self.capacity!r}")
        if self.factors not in _FACTORS:
            problems.append(f"`factors` must be one of {_FACTORS}, got {self.factors!r}")
        if not isinstance(self.num_cores, int) or self.num_cores < 2:
            problems.append(f"`num_cores` must be an integer >= 2, got {self.num_cores!r}")
        if not isinstance(self.aux_core_size, int) or self.aux_core_size < 1:
            problems.append(f"`aux_core_size` must be an integer >= 1, got {self.aux_core_size!r}")
        if self.aux_lr is not None and not (is_number(self.aux_lr) and self.aux_lr > 0):
            problems.append(f"`aux_lr` must be > 0 or None, got {self.aux_lr!r}")
        if self.init_std is not None and not (is_number(self.init_std) and self.init_std > 0):
            problems.append(f"`init_std` must be > 0 or None, got {self.init_std!r}")
        if self.schedule not in _SCHEDULES:
            problems.append(f"`schedule` must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.scope not in _SCOPES:
            problems.append(f"`scope` must be one of {_SCOPES}, got {self.scope!r}")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            problems.append(f"`budget` must be an integer >= 1 (auxiliary parameters) or None, got {self.budget!r}")
        if self.budget_ratio is not None and not (is_number(self.budget_ratio) and self.budget_ratio > 0):
            problems.append(f"`budget_ratio` must be > 0 or None, got {self.budget_ratio!r}")
        if self.budget is not None and self.budget_ratio is not None:
            problems.append("set `budget` or `budget_ratio`, not both")
        if not isinstance(self.prepass_batches, int) or self.prepass_batches < 1:
            problems.append(f"`prepass_batches` must be an integer >= 1, got {self.prepass_batches!r}")
        if not isinstance(self.levels, int) or self.levels < 1:
            problems.append(f"`levels` must be an integer >= 1, got {self.levels!r}")
        elif self.levels > 1 and self.schedule == "static":
            problems.append("`levels` > 1 needs schedule 'prepass' or 'dynamic' (static capacities come from rules)")
        problems += phase_problems("interval", self.interval, minimum=1)
        problems += phase_problems("warmup_steps", self.warmup_steps, minimum=0)
        problems += phase_problems("final_steps", self.final_steps, minimum=0)
        fractions = [v for v in (self.warmup_steps, self.final_steps) if is_fraction(v)]
        if len(fractions) == 2 and sum(fractions) >= 1:
            problems.append(
                f"`warmup_steps` + `final_steps` ({self.warmup_steps} + {self.final_steps} of the run) must stay "
                "below 1: no step would be left to re-allocate"
            )
        for name in ("beta1", "beta2"):
            if not is_number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                problems.append(f"`{name}` must be a number in [0, 1), got {getattr(self, name)!r}")
        for name in ("uncertainty", "collapse_on_train_end"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"`{name}` must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            problems.append(f"`seed` must be an integer >= 0, got {self.seed!r}")
        if self.target_modules is not None and not self.target_modules:
            problems.append("`target_modules` is empty: use None for every LoRA module")
        if problems:
            raise ValueError("invalid LoraOverConfig: " + "; ".join(problems))

    def factor_keys(self) -> tuple[str, ...]:
        """The LoRA factors to over-parameterize: ``("A", "B")``, ``("A",)`` or ``("B",)``."""
        return ("A", "B") if self.factors == "both" else (self.factors,)

    def capacity_of(self, name: str) -> float:
        """Capacity of the LoRA module ``name`` under the rules and the default."""
        for rule in self.rules:
            if rule.selects(name):
                return float(rule.capacity)
        return float(self.capacity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoraOverConfig:
        """Build from a plain dict (YAML, JSON); unknown keys are an error naming them."""
        return from_dict(cls, values)
