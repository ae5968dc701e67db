"""The model-patching hook: install, inspect, change and collapse LoRA-Over factors on a PEFT model.

``apply_lora_over`` moves the chosen ``lora_A`` / ``lora_B`` weights into a :class:`~.bank.FactorBank`
(one flat parameter per dtype and device, kept in the base model as ``lora_over_bank``); each LoRA weight
becomes a slice of one batched contraction per layout and forward. ``collapse`` writes the contractions back
as plain PEFT LoRA weights, so the saved adapter is a standard one. :func:`set_layouts` is the one primitive
behind every change a capacity scheduler makes (enter, leave, grow, shrink); each keeps the module's function.
"""

from __future__ import annotations

import functools
import logging
import math
import zlib
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from lora_over_trl.lora_over import mpo
from lora_over_trl.lora_over.bank import FactorBank, FactorHandle
from lora_over_trl.lora_over.config import LoraOverConfig
from lora_over_trl.utils.fields import module_matches
from lora_over_trl.utils.peft_layers import lora_modules

__all__ = [
    "ApplyReport",
    "apply_lora_over",
    "banked_factors",
    "banks",
    "collapse",
    "over_parameterized_factors",
    "plain_layout",
    "plan_layout",
    "set_layouts",
]

logger = logging.getLogger(__name__)

FACTOR_NAMES = {"A": "lora_A", "B": "lora_B"}
FACTOR_OF_ATTR = {attr: which for which, attr in FACTOR_NAMES.items()}
BANK_ATTR = "lora_over_bank"  # "lora_" in the name: PEFT saves and loads it with the adapter's own tensors
_HOOK_ATTR = "_lora_over_refresh_hook"


def factor_linears(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Linear]:
    """Every LoRA factor's linear, keyed ``"<module>.lora_A"`` / ``"<module>.lora_B"``."""
    return {
        f"{name}.{attr}": getattr(layer, attr)[adapter_name]
        for name, layer in lora_modules(model, adapter_name).items()
        for attr in FACTOR_NAMES.values()
    }


def _root(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def banks(model: nn.Module, adapter_name: str = "default") -> dict[str, FactorBank]:
    """The model's factor banks for ``adapter_name``, by part (``"<dtype>_<device>"``); empty when none."""
    holder = getattr(_root(model), BANK_ATTR, None)
    if holder is None or adapter_name not in holder:
        return {}
    return dict(holder[adapter_name].items())


def banked_factors(model: nn.Module, adapter_name: str = "default") -> dict[str, FactorHandle]:
    """Every factor the bank holds, keyed ``"<module>.lora_A"`` / ``"<module>.lora_B"``: the over-parameterized ones
    and, in a scheduled run, the plain ones kept there as one core (:func:`plain_layout`)."""
    return {
        key: FactorHandle(bank, key) for bank in banks(model, adapter_name).values() for key in sorted(bank.layouts)
    }


def over_parameterized_factors(model: nn.Module, adapter_name: str = "default") -> dict[str, FactorHandle]:
    """Every over-parameterized factor (two cores or more), keyed ``"<module>.lora_A"`` / ``"<module>.lora_B"``."""
    return {key: f for key, f in banked_factors(model, adapter_name).items() if f.layout.num_cores > 1}


def module_generator(seed: int, name: str) -> torch.Generator:
    """A generator that depends only on the seed and the factor's name: every rank and every order agree."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def default_std(in_features: int) -> float:
    """Scale of the random half of padded bond slots: Kaiming-like, ``1 / sqrt(fan_in)`` of the factor."""
    return 1.0 / math.sqrt(max(in_features, 1))


def plain_layout(shape: tuple[int, int]) -> mpo.MpoLayout:
    """A plain LoRA factor kept in the bank: one core holding the weight, no auxiliary parameter.

    The ``prepass`` and ``dynamic`` schedules keep every factor they may move in the bank from the start, plain
    ones in this layout: a move then rewrites slots of the bank's one parameter, whose size never changes, and no
    parameter appears or disappears mid-run (which DDP's buckets and FSDP2's shards could not follow).
    """
    return mpo.MpoLayout((shape[0],), (shape[1],), (), 0)


@functools.lru_cache(maxsize=4096)  # a pure function of small arguments, asked again at every re-allocation
def plan_layout(
    shape: tuple[int, int], capacity: float, *, num_cores: int = 2, aux_core_size: int = 16
) -> mpo.MpoLayout | None:
    """The layout of a factor of ``shape`` with at most ``capacity * p * q`` auxiliary parameters.

    ``None`` when the capacity cannot hold even the exact layout (the factor stays plain).
    """
    if capacity <= 0:
        return None
    base = mpo.choose_layout(*shape, num_cores=num_cores, aux_size=aux_core_size)
    return mpo.fit_bonds(base, math.floor(capacity * shape[0] * shape[1]))


def _part(tensor: torch.Tensor) -> str:
    device = tensor.device
    return f"{str(tensor.dtype).removeprefix('torch.')}_{device.type}" + (
        f"_{device.index}" if device.index is not None else ""
    )


class _RefreshHook:
    """Forward pre-hook of the base model: contract every bank at the start of a forward (unless the last
    contraction still holds: generation with gradients off contracts once, not at every token)."""

    def __init__(self, adapter_name: str) -> None:
        self.adapter_name = adapter_name

    def __call__(self, root: nn.Module, args: tuple) -> None:
        holder = getattr(root, BANK_ATTR, None)
        if holder is not None and self.adapter_name in holder:
            for bank in holder[self.adapter_name].values():
                bank.prepare_forward()


def _ensure_refresh_hook(root: nn.Module, adapter_name: str) -> None:
    # On the innermost model, which training, evaluation and `generate` all call. Reads outside a forward
    # still get current weights (the bank contracts when stale); the hook makes it one contraction per forward.
    if getattr(root, _HOOK_ATTR, None) is None:
        setattr(root, _HOOK_ATTR, root.register_forward_pre_hook(_RefreshHook(adapter_name)))


def _drop_bank_if_empty(root: nn.Module, adapter_name: str) -> None:
    holder = getattr(root, BANK_ATTR, None)
    if holder is None or adapter_name not in holder:
        return
    for part in [p for p, bank in holder[adapter_name].items() if not bank.layouts]:
        del holder[adapter_name][part]
    if not len(holder[adapter_name]):
        del holder[adapter_name]
    if not len(holder):
        delattr(root, BANK_ATTR)
        handle = getattr(root, _HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            setattr(root, _HOOK_ATTR, None)


def set_layouts(
    model: nn.Module,
    targets: dict[str, mpo.MpoLayout | None],
    config: LoraOverConfig,
    *,
    aux_scale: float = 1.0,
    optimizer: torch.optim.Optimizer | None = None,
    reserve: int | dict[str, int] = 0,
) -> dict[str, float]:
    """Give the named factors these layouts (``None``: plain LoRA), keeping every module's function.

    A plain factor that gets a layout is decomposed exactly (:func:`mpo.decompose`); a factor that loses it
    gets its contraction as a plain weight (the forward's own values, bit for bit); a factor whose bonds grow
    is padded (exact); one whose bonds shrink is re-decomposed by SVD and its relative error is returned.
    Factors not named are untouched. The bank's storage keeps its parameter object: an ``optimizer`` given
    here has its moments moved with the factors (new factors start at zero). A factor that leaves the bank gets a
    new plain parameter, which an optimizer does not hold yet: the schedules keep their factors in the bank as
    :func:`plain_layout` instead, so that only the final collapse takes factors out.

    Args:
        targets: factor key (``"<module>.lora_A"``) -> layout or ``None``.
        aux_scale: the bank's auxiliary learning-rate scale (used when this call creates the bank).
        reserve: storage elements to reserve when this call creates a bank (a dynamic schedule's maximum),
            or a dict of them by bank part.

    Returns:
        The relative error of each factor whose bonds shrank (0.0 for growth).
    """
    adapter = config.adapter_name
    root = _root(model)
    linears = factor_linears(model, adapter)
    unknown = sorted(set(targets) - set(linears))
    if unknown:
        raise ValueError(f"set_layouts: no LoRA factor named {unknown[:3]}; factors are e.g. {sorted(linears)[:2]}")
    current = {key: (part, bank) for part, bank in banks(model, adapter).items() for key in bank.layouts}
    plans: dict[str, dict[str, mpo.MpoLayout]] = {
        part: dict(bank.layouts) for part, bank in banks(model, adapter).items()
    }
    values: dict[str, dict[str, list[torch.Tensor]]] = {}
    leaving: dict[str, tuple[FactorBank, torch.Tensor]] = {}
    entering: dict[str, str] = {}
    errors: dict[str, float] = {}
    for key in sorted(targets):
        layout = targets[key]
        if key in current:
            part, bank = current[key]
            old = bank.layouts[key]
            if layout == old:
                continue
            if layout is None:
                leaving[key] = (bank, None)
                del plans[part][key]
                continue
            if layout.shape != old.shape:
                raise ValueError(f"set_layouts: `{key}` has shape {old.shape}, the layout {layout.shape}")
            cores = bank.effective_cores(key)
            std = config.init_std or default_std(layout.shape[1])
            generator = module_generator(config.seed + 1, f"{key.rsplit('.lora_', 1)[0]}.{key[-1]}.{layout.bonds}")
            if (layout.rows, layout.cols) != (old.rows, old.cols):  # other cores: start exact from the contraction
                weight = mpo.contract(cores)
                new = mpo.decompose(weight, layout, std=std, generator=generator)
                errors[key] = 0.0
            elif all(b >= a for a, b in zip(old.bonds, layout.bonds, strict=True)):
                new, errors[key] = mpo.grow(cores, layout, std=std, generator=generator), 0.0
            else:
                new, errors[key] = mpo.truncate(cores, layout, std=std, generator=generator)
            values.setdefault(part, {})[key] = new
            plans[part][key] = layout
        elif layout is not None:
            weight = linears[key].weight.detach()
            if tuple(weight.shape) != layout.shape:
                raise ValueError(
                    f"set_layouts: `{key}` weight has shape {tuple(weight.shape)} but the layout needs "
                    f"{layout.shape}: the adapter's rank or the base model differ"
                )
            std = config.init_std or default_std(weight.shape[1])
            cores = mpo.decompose(weight, layout, std=std, generator=module_generator(config.seed, key))
            part = _part(weight)
            values.setdefault(part, {})[key] = cores
            plans.setdefault(part, {})[key] = layout
            entering[key] = part
    if not (values or leaving or entering):
        return errors
    # Leaving factors take the forward's own contraction (before any repack moves their cores).
    with torch.no_grad():
        for bank in {id(b): b for b, _ in leaving.values()}.values():
            bank.refresh()
        leaving = {key: (bank, bank.weight_of(key).detach().clone()) for key, (bank, _) in leaving.items()}
    holder = getattr(root, BANK_ATTR, None)
    if holder is None:
        holder = nn.ModuleDict()
        setattr(root, BANK_ATTR, holder)
    if adapter not in holder:
        holder[adapter] = nn.ModuleDict()
    for part, plan in plans.items():
        if part not in holder[adapter]:
            weight = linears[next(k for k, p in entering.items() if p == part)].weight
            wanted = reserve.get(part, 0) if isinstance(reserve, dict) else reserve
            holder[adapter][part] = FactorBank(
                max(wanted, FactorBank.numel(plan.values())),
                dtype=weight.dtype,
                device=weight.device,
                aux_scale=aux_scale,
            )
            holder[adapter][part].storage.requires_grad_(weight.requires_grad)
        holder[adapter][part].repack(plan, values.get(part, {}), optimizer)
    for key, (bank, weight) in leaving.items():
        bank.detach_linear(key, weight, requires_grad=bank.storage.requires_grad)
    for key, part in entering.items():
        holder[adapter][part].attach(key, linears[key])
    _drop_bank_if_empty(root, adapter)
    if banks(model, adapter):
        _ensure_refresh_hook(root, adapter)
    return errors


@dataclass
class ApplyReport:
    """What :func:`apply_lora_over` did: layouts per module and factor, and parameter counts."""

    layouts: dict[str, dict[str, mpo.MpoLayout | None]] = field(default_factory=dict)
    lora_params: int = 0
    aux_params: int = 0

    def __str__(self) -> str:
        installed = sum(layout is not None for f in self.layouts.values() for layout in f.values())
        ratio = self.aux_params / max(self.lora_params, 1)
        return (
            f"LoRA-Over: {installed} factors over-parameterized in {len(self.layouts)} modules; "
            f"LoRA params {self.lora_params:,}, auxiliary params {self.aux_params:,} ({ratio:.2f}x)"
        )


def module_layouts(shapes: dict[str, tuple[int, int]], capacity: float, config: LoraOverConfig) -> dict:
    """``{"A": layout or None, "B": ...}`` for a module whose factors have ``shapes`` (the config's factors only)."""
    return {
        which: plan_layout(shapes[which], capacity, num_cores=config.num_cores, aux_core_size=config.aux_core_size)
        if which in config.factor_keys()
        else None
        for which in FACTOR_NAMES
    }


def apply_lora_over(
    model: nn.Module,
    config: LoraOverConfig,
    capacities: dict[str, float] | None = None,
    *,
    aux_scale: float = 1.0,
    reserve: int = 0,
) -> ApplyReport:
    """Over-parameterize the LoRA factors of a PEFT model in place; its outputs stay bit for bit the same.

    Args:
        model: a ``PeftModel`` (or any module holding PEFT LoRA layers) on any base: fp32, bf16, 4-bit.
        config: what to over-parameterize and how much (:class:`LoraOverConfig`).
        capacities: optional explicit capacity per module name (a scheduler's decision); it replaces the
            config's rules and default. Modules not named stay plain LoRA.
        aux_scale: the auxiliary cores' learning rate as a multiple of the main one, under Adam-family
            optimizers: they are stored divided by it and multiplied back in the contraction (Adam's step
            ignores the gradient's scale). ``LoraOverCallback`` sets it to ``aux_lr / learning_rate``.
        reserve: storage elements to reserve in the bank (for later growth without re-allocation).

    Returns:
        An :class:`ApplyReport` (``print`` it for a one-line summary).

    Raises:
        ValueError: the model has no LoRA layers for the adapter, is already over-parameterized,
            ``target_modules`` or a rule matches no LoRA module, or ``capacities`` names unknown modules.

    Example:
        >>> report = apply_lora_over(peft_model, LoraOverConfig(capacity=1.0))
        >>> print(report)
    """
    layers = lora_modules(model, config.adapter_name)
    if not layers:
        raise ValueError(
            f"apply_lora_over: the model has no linear LoRA layers with adapter `{config.adapter_name}`; "
            "wrap it with peft.get_peft_model(model, LoraConfig(...)) first, or set `adapter_name`"
        )
    if banked_factors(model, config.adapter_name):
        raise ValueError("apply_lora_over: the model is already over-parameterized; call collapse() first")
    if not aux_scale > 0:
        raise ValueError(f"apply_lora_over: `aux_scale` must be > 0, got {aux_scale!r}")
    capacities = _resolve_capacities(layers, config) if capacities is None else dict(capacities)
    unknown = sorted(set(capacities) - set(layers))
    if unknown:
        raise ValueError(
            f"apply_lora_over: `capacities` names modules without LoRA: {unknown[:5]}; "
            f"LoRA modules are e.g. {sorted(layers)[:3]}"
        )
    report = ApplyReport()
    targets: dict[str, mpo.MpoLayout | None] = {}
    for name in sorted(layers):
        linears = {w: getattr(layers[name], attr)[config.adapter_name] for w, attr in FACTOR_NAMES.items()}
        report.lora_params += sum(linear.weight.numel() for linear in linears.values())
        if capacities.get(name, 0.0) > 0:
            shapes = {w: tuple(linear.weight.shape) for w, linear in linears.items()}
            chosen = module_layouts(shapes, capacities[name], config)
            report.layouts[name] = {w: chosen[w] for w in config.factor_keys()}
            targets.update({f"{name}.{FACTOR_NAMES[w]}": layout for w, layout in chosen.items() if layout})
    set_layouts(model, targets, config, aux_scale=aux_scale, reserve=reserve)
    report.aux_params = sum(f.aux_params for f in over_parameterized_factors(model, config.adapter_name).values())
    model.lora_over_config = config  # saved beside checkpoints; read by save/load and the callback
    logger.info("%s", report)
    return report


def _resolve_capacities(layers: dict[str, LoraLayer], config: LoraOverConfig) -> dict[str, float]:
    names = sorted(layers)
    if config.target_modules is not None:
        names = [n for n in names if module_matches(n, config.target_modules)]
        if not names:
            raise ValueError(
                f"`target_modules` {config.target_modules!r} matches none of the LoRA modules, "
                f"e.g. {sorted(layers)[:3]}"
            )
    for i, rule in enumerate(config.rules):
        if not any(rule.selects(n) for n in names):
            raise ValueError(
                f"`rules[{i}]` ({rule.target_modules!r}, layers={rule.layers}) matches none of the LoRA modules, "
                f"e.g. {names[:3]}"
            )
    return {n: config.capacity_of(n) for n in names}


def collapse(model: nn.Module, adapter_name: str | None = None, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Contract every over-parameterized factor into plain LoRA weights, in place.

    By default the weights are the forward's own contraction (outputs stay bit for bit). With a ``dtype``
    (e.g. ``torch.float32``) other than the bank's, they are the float64 contraction rounded once to it: a run
    trained in bfloat16 (TRL does so on 4-bit bases) keeps its function more exactly in float32, since
    rounding ``B A`` to bfloat16 costs a relative error of about 1e-3.

    Afterwards ``model.save_pretrained`` writes a standard PEFT LoRA adapter (same keys and config as
    vanilla LoRA of the same rank) that stock PEFT loads without this package.

    Returns:
        Per module, the relative error of ``B A`` (the collapsed weights against a float64 contraction of
        the cores, computed through Gram matrices so the ``m x n`` product is never formed).

    Raises:
        ValueError: nothing to collapse (never applied, or collapsed already).
    """
    config = getattr(model, "lora_over_config", None)
    adapter_name = adapter_name or (config.adapter_name if config else "default")
    factors = banked_factors(model, adapter_name)
    if not factors:
        raise ValueError(
            "collapse: the model has no over-parameterized LoRA factors (collapse() already ran, "
            "or apply_lora_over() never did)"
        )
    linears = factor_linears(model, adapter_name)
    references = {key: f.bank.contract_one(key, torch.float64) for key, f in factors.items()}
    set_layouts(model, dict.fromkeys(factors), config or LoraOverConfig(adapter_name=adapter_name))
    for key, reference in references.items():
        weight = linears[key].weight
        if dtype is not None and weight.dtype != dtype:
            linears[key].weight = nn.Parameter(reference.to(dtype), requires_grad=weight.requires_grad)
    errors = {}
    for name in sorted({key.rsplit(".", 1)[0] for key in factors}):
        pair = {}
        for attr in FACTOR_NAMES.values():
            key = f"{name}.{attr}"
            collapsed = linears[key].weight.detach().double()
            pair[attr] = (collapsed, references.get(key, collapsed))
        (a, ref_a), (b, ref_b) = pair["lora_A"], pair["lora_B"]
        with torch.no_grad():
            difference, scale = _difference_and_scale(b, a, ref_b, ref_a)
        errors[name] = float(difference / scale) if scale > 0 else float(difference)
    logger.info("LoRA-Over collapse: %d modules, max relative error of B A %.2e", len(errors), max(errors.values()))
    return errors


def _difference_and_scale(
    b: torch.Tensor, a: torch.Tensor, ref_b: torch.Tensor, ref_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``||B A - B' A'||_F`` and ``||B' A'||_F`` without forming an ``m x n`` product: with ``X = [B, -B']`` and
    ``Y = [A; A']``, ``||X Y||_F^2 = sum((X^T X) * (Y Y^T))``, cost ``O((m + n) r^2)``; the second norm is the
    same sum over the Gram matrices' ``B'``/``A'`` blocks."""
    r = b.shape[1]
    x, y = torch.cat([b, -ref_b], 1), torch.cat([a, ref_a])
    gram_b, gram_a = x.T @ x, y @ y.T
    whole = (gram_b * gram_a).sum()
    reference = (gram_b[r:, r:] * gram_a[r:, r:]).sum()
    return torch.sqrt(torch.clamp(whole, min=0.0)), torch.sqrt(torch.clamp(reference, min=0.0))
