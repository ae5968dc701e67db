"""The model-patching hook: install, inspect and collapse LoRA-Over factors on a PEFT model.

``apply_lora_over`` registers an :class:`~lora_over_trl.factor.MpoFactor` parametrization on the chosen
``lora_A`` / ``lora_B`` weights; ``collapse`` contracts the cores once more and leaves plain PEFT LoRA
weights behind, so the saved adapter is a standard one. The per-module functions
(:func:`over_parameterize_module`, :func:`collapse_module`, :func:`resize_module`) are what a capacity
scheduler calls at run time; each keeps the module's function.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn.utils import parametrize

from . import mpo
from .config import LoraOverConfig, module_matches
from .factor import MpoFactor, default_std, refresh_all

__all__ = [
    "ApplyReport",
    "apply_lora_over",
    "collapse",
    "collapse_module",
    "lora_modules",
    "lora_over_parameter_groups",
    "over_parameterize_module",
    "over_parameterized_factors",
    "resize_module",
]

logger = logging.getLogger(__name__)

_PEFT_PREFIX = "base_model.model."
FACTOR_NAMES = {"A": "lora_A", "B": "lora_B"}
FACTOR_OF_ATTR = {attr: which for which, attr in FACTOR_NAMES.items()}


def _user_name(name: str) -> str:
    """Module names as PEFT's ``target_modules`` sees them (inside the base model)."""
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def lora_modules(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """Linear LoRA layers of ``model`` that carry ``adapter_name``, by name inside the base model."""
    return {
        _user_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
        and adapter_name in module.lora_A
        and isinstance(module.lora_A[adapter_name], nn.Linear)
    }


def _factor_linear(layer: LoraLayer, which: str, adapter_name: str) -> nn.Linear:
    return getattr(layer, FACTOR_NAMES[which])[adapter_name]


def _mpo_factor(linear: nn.Linear) -> MpoFactor | None:
    if not parametrize.is_parametrized(linear, "weight"):
        return None
    found = [p for p in linear.parametrizations.weight if isinstance(p, MpoFactor)]
    return found[0] if found else None


def over_parameterized_factors(model: nn.Module, adapter_name: str = "default") -> dict[str, MpoFactor]:
    """Every installed factor, keyed ``"<module>.lora_A"`` / ``"<module>.lora_B"``."""
    found = {}
    for name, layer in lora_modules(model, adapter_name).items():
        for which, attr in FACTOR_NAMES.items():
            factor = _mpo_factor(_factor_linear(layer, which, adapter_name))
            if factor is not None:
                found[f"{name}.{attr}"] = factor
    return found


def module_generator(seed: int, name: str) -> torch.Generator:
    """A generator that depends only on the seed and the factor's name: every rank and every order agree."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


_HOOK_ATTR = "_lora_over_refresh_hook"
_installs = 0  # bumped whenever a factor is installed or removed: the hook's list of factors is stale then


def _factors_changed() -> None:
    global _installs
    _installs += 1


class _RefreshHook:
    """Forward pre-hook: refresh every factor under the root; the list is rebuilt only after installs."""

    def __init__(self) -> None:
        self.seen, self.factors = -1, []

    def __call__(self, root: nn.Module, args: tuple) -> None:
        if self.seen != _installs:
            self.factors = [m for m in root.modules() if isinstance(m, MpoFactor)]
            self.seen = _installs
        refresh_all(self.factors)


def ensure_refresh_hook(model: nn.Module) -> None:
    """Contract every factor once at the start of each forward of the model (see ``MpoFactor.refresh``).

    The hook sits on the innermost model (``get_base_model()``), which training, evaluation and
    ``generate`` all call. Without it everything stays correct, only slower.
    """
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(root, _HOOK_ATTR, None) is None:
        setattr(root, _HOOK_ATTR, root.register_forward_pre_hook(_RefreshHook()))


def _remove_refresh_hook(model: nn.Module) -> None:
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = getattr(root, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        setattr(root, _HOOK_ATTR, None)


def _install(linear: nn.Linear, factor: MpoFactor) -> None:
    _factors_changed()
    requires_grad = linear.weight.requires_grad
    parametrize.register_parametrization(linear, "weight", factor)
    linear.parametrizations.weight.original.requires_grad_(False)
    for core in factor.cores:
        core.requires_grad_(requires_grad)


def over_parameterize_module(
    layer: LoraLayer, name: str, capacity: float, config: LoraOverConfig, *, aux_scale: float = 1.0
) -> dict[str, mpo.MpoLayout | None]:
    """Over-parameterize the chosen factors of one LoRA layer, keeping its function (bit for bit when
    ``aux_scale`` is 1; see :class:`MpoFactor` for what the scale does).

    Returns the layout per factor (``None`` where the capacity holds no layout and the factor stays plain).
    """
    layouts: dict[str, mpo.MpoLayout | None] = {}
    for which in config.factor_keys():
        linear = _factor_linear(layer, which, config.adapter_name)
        if _mpo_factor(linear) is not None:
            raise ValueError(f"`{name}.{FACTOR_NAMES[which]}` is already over-parameterized")
        weight = linear.weight.detach()
        factor = MpoFactor.from_weight(
            weight,
            capacity,
            num_cores=config.num_cores,
            aux_core_size=config.aux_core_size,
            std=config.init_std,
            generator=module_generator(config.seed, f"{name}.{FACTOR_NAMES[which]}"),
            aux_scale=aux_scale,
        )
        layouts[which] = None if factor is None else factor.layout
        if factor is not None:
            _install(linear, factor)
    return layouts


def install_layout(
    layer: LoraLayer, which: str, adapter_name: str, layout: mpo.MpoLayout, aux_scale: float = 1.0
) -> MpoFactor:
    """Install zero cores of a known layout (to be filled from a checkpoint's state dict)."""
    linear = _factor_linear(layer, which, adapter_name)
    if tuple(linear.weight.shape) != layout.shape:
        raise ValueError(
            f"`{FACTOR_NAMES[which]}` weight has shape {tuple(linear.weight.shape)} but the recorded layout "
            f"needs {layout.shape}: the adapter's rank or the base model differ from the checkpoint's"
        )
    factor = MpoFactor.empty(layout, dtype=linear.weight.dtype, device=linear.weight.device, aux_scale=aux_scale)
    _install(linear, factor)
    return factor


def resize_module(layer: LoraLayer, name: str, which: str, bonds: tuple[int, ...], config: LoraOverConfig) -> float:
    """Grow (exact) or truncate (SVD, error returned) the bonds of one installed factor."""
    linear = _factor_linear(layer, which, config.adapter_name)
    factor = _mpo_factor(linear)
    if factor is None:
        raise ValueError(f"`{name}.{FACTOR_NAMES[which]}` is not over-parameterized")
    std = config.init_std or default_std(factor.layout.shape[1])
    return factor.resize(bonds, std=std, generator=module_generator(config.seed + 1, f"{name}.{which}.{bonds}"))


def remove_factor(linear: nn.Linear) -> None:
    """Leave the contracted value as a plain weight, trainable as the cores were (nothing if not installed)."""
    factor = _mpo_factor(linear)
    if factor is None:
        return
    _factors_changed()
    requires_grad = factor.cores[0].requires_grad
    parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
    linear.weight.requires_grad_(requires_grad)


def collapse_module(layer: LoraLayer, adapter_name: str = "default", dtype: torch.dtype | None = None) -> float:
    """Write the contracted factors into plain LoRA weights; returns the relative error of ``B A``.

    By default the weights are the contraction the forward pass uses (so outputs stay bit for bit); with a
    ``dtype`` other than the cores' one, they are the float64 contraction rounded once to ``dtype``. The
    error compares them with a float64 contraction, through Gram matrices so the ``m x n`` product is never
    formed: about 1e-7 in float32, 1e-3 in bfloat16 (the rounding of the stored weights).
    """
    linear_a, linear_b = _factor_linear(layer, "A", adapter_name), _factor_linear(layer, "B", adapter_name)
    with torch.no_grad():
        reference_a, reference_b = _weight_f64(linear_a), _weight_f64(linear_b)
    for linear, reference in ((linear_a, reference_a), (linear_b, reference_b)):
        remove_factor(linear)
        weight = linear.weight
        if dtype is not None and weight.dtype != dtype:
            linear.weight = nn.Parameter(reference.to(dtype), requires_grad=weight.requires_grad)
    with torch.no_grad():
        collapsed_a, collapsed_b = linear_a.weight.double(), linear_b.weight.double()
        difference = _product_norm(torch.cat([collapsed_b, -reference_b], 1), torch.cat([collapsed_a, reference_a]))
        scale = _product_norm(reference_b, reference_a)
    return float(difference / scale) if scale > 0 else float(difference)


def _product_norm(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``||B A||_F`` from ``trace((B^T B)(A A^T))``: cost ``O((m + n) r^2)`` instead of ``O(m n r)``."""
    return torch.sqrt(torch.clamp(((b.T @ b) * (a @ a.T)).sum(), min=0.0))


def _weight_f64(linear: nn.Linear) -> torch.Tensor:
    factor = _mpo_factor(linear)
    if factor is None:
        return linear.weight.detach().double()
    scale = factor.aux_scale  # applied in float64 too, so the reference carries no float32 rounding
    central = factor.layout.central
    return mpo.contract([t.detach().double() * (1.0 if j == central else scale) for j, t in enumerate(factor.cores)])


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


def apply_lora_over(
    model: nn.Module, config: LoraOverConfig, capacities: dict[str, float] | None = None, *, aux_scale: float = 1.0
) -> ApplyReport:
    """Over-parameterize the LoRA factors of a PEFT model in place; its outputs stay bit for bit the same.

    Args:
        model: a ``PeftModel`` (or any module holding PEFT LoRA layers) on any base: fp32, bf16, 4-bit.
        config: what to over-parameterize and how much (:class:`LoraOverConfig`).
        capacities: optional explicit capacity per module name (a scheduler's decision); it replaces the
            config's rules and default. Modules not named stay plain LoRA.
        aux_scale: multiplier of the auxiliary cores' learning rate under Adam (see :class:`MpoFactor`);
            ``LoraOverCallback`` sets it to ``aux_lr / learning_rate``. Leave it at 1 when giving the
            cores their own optimizer group (:func:`lora_over_parameter_groups`) instead.

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
    if over_parameterized_factors(model, config.adapter_name):
        raise ValueError("apply_lora_over: the model is already over-parameterized; call collapse() first")
    capacities = _resolve_capacities(layers, config) if capacities is None else dict(capacities)
    unknown = sorted(set(capacities) - set(layers))
    if unknown:
        raise ValueError(
            f"apply_lora_over: `capacities` names modules without LoRA: {unknown[:5]}; "
            f"LoRA modules are e.g. {sorted(layers)[:3]}"
        )
    report = ApplyReport()
    for name in sorted(layers):
        lora_a, lora_b = (_factor_linear(layers[name], w, config.adapter_name).weight for w in ("A", "B"))
        report.lora_params += lora_a.numel() + lora_b.numel()
        if capacities.get(name, 0.0) > 0:
            report.layouts[name] = over_parameterize_module(
                layers[name], name, capacities[name], config, aux_scale=aux_scale
            )
    report.aux_params = sum(f.aux_params for f in over_parameterized_factors(model, config.adapter_name).values())
    model.lora_over_config = config  # saved beside checkpoints; read by save/load and the callback
    ensure_refresh_hook(model)
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

    ``dtype`` (e.g. ``torch.float32``) stores the collapsed weights in that precision; by default they keep
    the cores' dtype. A run trained in bfloat16 (TRL does so on 4-bit bases) keeps its function more exactly
    in float32: rounding ``B A`` to bfloat16 costs a relative error of about 1e-3.

    Afterwards ``model.save_pretrained`` writes a standard PEFT LoRA adapter (same keys and config as
    vanilla LoRA of the same rank) that stock PEFT loads without this package.

    Returns:
        The relative error of each module's ``B A`` (collapsed weights against a float64 contraction).

    Raises:
        ValueError: nothing to collapse (never applied, or collapsed already).
    """
    config = getattr(model, "lora_over_config", None)
    adapter_name = adapter_name or (config.adapter_name if config else "default")
    factors = over_parameterized_factors(model, adapter_name)
    if not factors:
        raise ValueError(
            "collapse: the model has no over-parameterized LoRA factors (collapse() already ran, "
            "or apply_lora_over() never did)"
        )
    layers = lora_modules(model, adapter_name)
    modules = sorted({key.rsplit(".", 1)[0] for key in factors})
    errors = {name: collapse_module(layers[name], adapter_name, dtype) for name in modules}
    _remove_refresh_hook(model)
    logger.info("LoRA-Over collapse: %d modules, max relative error of B A %.2e", len(errors), max(errors.values()))
    return errors


def lora_over_parameter_groups(
    model: nn.Module, lr: float, *, aux_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer parameter groups with the auxiliary cores at their own learning rate.

    Every trainable parameter is in exactly one group: the auxiliary cores at ``aux_lr`` (``lr`` when
    ``None``), everything else at ``lr``. Pass the result to any ``torch.optim`` optimizer.
    """
    config = getattr(model, "lora_over_config", None)
    aux_lr = aux_lr if aux_lr is not None else (config.aux_lr if config and config.aux_lr else lr)
    adapter_name = config.adapter_name if config else "default"
    aux_ids = {id(t) for f in over_parameterized_factors(model, adapter_name).values() for t in f.auxiliary_cores()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    main = [p for p in trainable if id(p) not in aux_ids]
    aux = [p for p in trainable if id(p) in aux_ids]
    groups = [{"params": main, "lr": lr, "weight_decay": weight_decay}]
    if aux:
        groups.append({"params": aux, "lr": aux_lr, "weight_decay": weight_decay})
    return groups
