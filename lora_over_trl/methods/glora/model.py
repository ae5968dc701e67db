"""GLoRA layers on PEFT LoRA layers (arXiv 2306.07967; code ``Arnav0400/ViT-Slim/GLoRA``).

::

    y = (W0 + W0 (.) A + B) x  +  b0 + b0 (.) D + E + W0 C          (.) elementwise

    A, B: lora_R = X_d[:, :R] X_u[:R] | vector = X_d[:, 0] (a column, broadcast) | scalar = X_d[0, 0] | none
    C:    lora_R | vector   (an input-sized column; W0 C is a bias)          D, E: vector | scalar | none

One set of stored weights per layer serves every choice (the supernet); a zero ``X_d`` (and zero D, E) makes
the adapter a no-op at the start. The layer stays PEFT's: :class:`GloraSupernet` takes the ``lora_A`` slot and
returns the whole update, ``lora_B`` becomes the identity and the scaling 1, so PEFT's forward (dropout, dtype
handling, 4-bit layers) and its checkpoints (every key holds ``lora_``) keep working. On a 4-bit base
``(W0 (.) A) x`` is computed as bitsandbytes computes ``W0 x``: ``W0`` dequantized for the matmul and dropped
right after, in forward and again in backward, so nothing of weight size is kept between them (see
:class:`_MaskedQuantizedLinear`).
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from lora_over_trl.methods.glora.config import GloraConfig
from lora_over_trl.utils.peft_layers import lora_modules, user_name

__all__ = [
    "TENSORS",
    "Choice",
    "GloraSupernet",
    "choice_params",
    "fix_choices",
    "glora_modules",
    "install_glora",
    "sample_choices",
    "search_space",
    "wrapped_parameters_refusal",
]

TENSORS = ("A", "B", "C", "D", "E")


class Choice(NamedTuple):
    """One layer's choice per support tensor, e.g. ``Choice("lora_8", "vector", "none", "none", "scalar")``."""

    A: str
    B: str
    C: str
    D: str
    E: str


def _rank(option: str) -> int:
    return int(option.split("_")[1])


class GloraSupernet(nn.Module):
    """GLoRA's support tensors for one linear layer; ``forward(x)`` is the update to add to ``W0 x + b0``.

    Args:
        base: the layer's frozen base (``nn.Linear``, bitsandbytes ``Linear4bit`` or GPT-2's ``Conv1D``); referenced,
            not owned.
        rank: the stored rank of the ``lora`` paths (``ranks`` on offer are prefixes of it).
        dtype, device: of the new parameters.
        fan_in_fan_out: the base stores ``W0`` as ``(in, out)`` (``Conv1D``; PEFT's flag of the same name).
    """

    def __init__(
        self, base: nn.Module, rank: int, *, dtype: torch.dtype, device: torch.device, fan_in_fan_out: bool = False
    ) -> None:
        super().__init__()
        # a plain attribute, not a submodule: the PEFT layer owns the base; no second copy in the state dict
        object.__setattr__(self, "base", base)
        self.fan_in_fan_out = fan_in_fan_out
        n_out, n_in = (
            (base.weight.shape[1], base.weight.shape[0]) if fan_in_fan_out else (base.out_features, base.in_features)
        )
        self.in_features, self.out_features = n_in, n_out

        def zeros(*shape):
            return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device))

        def xavier(*shape):
            return nn.Parameter(nn.init.xavier_uniform_(torch.empty(*shape, dtype=dtype, device=device)))

        # as in the paper's code: down factors (and D, E) at zero, up factors Xavier-uniform
        self.a_down, self.a_up = zeros(n_out, rank), xavier(rank, n_in)
        self.b_down, self.b_up = zeros(n_out, rank), xavier(rank, n_in)
        self.c_down, self.c_up = zeros(n_in, rank), xavier(rank, 1)
        # columns, not 1-D: PEFT warns of unsharded ZeRO-3 weights at every save for a 1-D lora_ tensor
        self.d_values, self.e_values = zeros(n_out, 1), zeros(n_out, 1)
        self.choice: Choice | None = None

    @property
    def weight(self) -> nn.Parameter:
        """For PEFT's forward, which casts the input to ``lora_A.weight.dtype``."""
        return self.b_up

    @property
    def has_bias(self) -> bool:
        return getattr(self.base, "bias", None) is not None

    @property
    def quantized(self) -> bool:
        return hasattr(self.base.weight, "quant_state")  # bitsandbytes Params4bit

    @property
    def w0(self) -> torch.Tensor:
        """The base weight as ``(out, in)``: a transposed view of a ``Conv1D``'s (not for a 4-bit base)."""
        return self.base.weight.T if self.fan_in_fan_out else self.base.weight

    def base_weight(self) -> torch.Tensor:
        """``W0`` as a dense ``(out, in)`` tensor (dequantized on a 4-bit base)."""
        weight = self.base.weight
        if self.quantized:
            return _dequantize(weight, weight.quant_state.dtype)
        return self.w0.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.choice
        if choice is None:
            raise RuntimeError("GLoRA layer without a choice: GloraCallback samples one per step; or fix_choices()")
        update = x.new_zeros(())
        if choice.A.startswith("lora") and self.quantized:
            k = _rank(choice.A)
            if getattr(self.base.weight.quant_state, "packing_format_for_cpu", False):
                # An eval forward on an AVX512-BF16 CPU repacked W0 into a layout only bitsandbytes' own matmul
                # reads: one base call on the k rank-scaled copies of x, (..., k, in).
                scaled = x.unsqueeze(-2) * self.a_up[:k]
                update = update + torch.einsum("...ko,ok->...o", self._w0_times(scaled), self.a_down[:, :k])
            else:
                dtype = getattr(self.base, "compute_dtype", None) or x.dtype  # the base layer's matmul dtype
                a_down, a_up = self.a_down[:, :k], self.a_up[:k]
                update = update + _MaskedQuantizedLinear.apply(x.to(dtype), a_down, a_up, self.base.weight).to(x.dtype)
        elif choice.A.startswith("lora"):
            weight = self.w0
            factor = support(choice.A, self.a_down, self.a_up).to(weight.dtype)
            update = update + F.linear(x.to(weight.dtype), weight * factor).to(x.dtype)
        elif choice.A != "none":
            update = update + support(choice.A, self.a_down, self.a_up).squeeze(-1) * self._w0_times(x)
        if choice.B.startswith("lora"):
            k = _rank(choice.B)
            update = update + F.linear(F.linear(x, self.b_up[:k]), self.b_down[:, :k])
        elif choice.B != "none":  # B = b 1^T: B x = b * sum(x)
            update = update + support(choice.B, self.b_down, self.b_up).squeeze(-1) * x.sum(-1, keepdim=True)
        bias = self.bias_update(choice)
        if bias is not None:
            update = update + bias
        return torch.broadcast_to(update, (*x.shape[:-1], self.out_features))

    def bias_update(self, choice: Choice) -> torch.Tensor | None:
        """``b0 (.) D + E + W0 C`` (``None`` when every bias path is off)."""
        terms = []
        if choice.C != "none":
            column = support(choice.C, self.c_down, self.c_up).squeeze(-1)  # (in,)
            terms.append(self._w0_times(column.unsqueeze(0)).squeeze(0))
        if choice.D != "none" and self.has_bias:
            terms.append(self.base.bias.to(self.d_values.dtype) * bias_support(choice.D, self.d_values))
        if choice.E != "none":
            terms.append(torch.broadcast_to(bias_support(choice.E, self.e_values), (self.out_features,)))
        return sum(terms) if terms else None

    def _w0_times(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x`` without the bias, in ``x``'s dtype."""
        if self.quantized:
            out = self.base(x)
            return out - self.base.bias.to(out.dtype) if self.has_bias else out
        weight = self.w0
        return F.linear(x.to(weight.dtype), weight).to(x.dtype)

    @torch.no_grad()
    def merged_update(
        self, w0: torch.Tensor, b0: torch.Tensor | None, choice: Choice
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W0 (.) A + B, b0 (.) D + E + W0 C)`` for ``choice`` in float64; the bias is ``None`` when unchanged.

        ``w0``/``b0`` are the base weights to merge into (the trained function's, dequantized on a 4-bit base).
        """
        w0 = w0.double()
        p = {name: t.detach().double() for name, t in self.named_parameters()}
        weight = torch.zeros_like(w0)
        if choice.A != "none":
            weight += w0 * support(choice.A, p["a_down"], p["a_up"])
        if choice.B != "none":
            weight += support(choice.B, p["b_down"], p["b_up"])
        terms = []
        if choice.C != "none":
            terms.append(w0 @ support(choice.C, p["c_down"], p["c_up"]).squeeze(-1))
        if choice.D != "none" and b0 is not None:
            terms.append(b0.double() * bias_support(choice.D, p["d_values"]))
        if choice.E != "none":
            terms.append(torch.broadcast_to(bias_support(choice.E, p["e_values"]), (w0.shape[0],)))
        return weight, (sum(terms) if terms else None)


class _MaskedQuantizedLinear(torch.autograd.Function):
    """``x (W0 (.) (A_d A_u))^T`` for a bitsandbytes 4-bit ``W0``, keeping only ``x`` and the factors for backward.

    The design first said: never build ``W0 (.) A`` on a 4-bit base, call the base layer on the ``R`` rank-scaled
    copies of ``x`` instead (``sum_k A_d[:, k] * W0 (A_u[k] * x)``). That is ``R`` times the layer's matmul in forward
    and in backward: GLoRA ran 4.6x LoRA's step at R <= 16 (BENCHMARKS.md). bitsandbytes' own 4-bit matmul
    dequantizes ``W0`` for each call and frees it; doing the same here costs one matmul per product (forward:
    ``x``; backward: ``dL/dx`` and ``dL/dA = (g^T x) (.) W0``), and the dense weight lives only inside each call.
    The product is computed in the dtype of ``x`` (the caller passes the base layer's compute dtype).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a_down: torch.Tensor, a_up: torch.Tensor, w0: nn.Parameter) -> torch.Tensor:
        ctx.save_for_backward(x, a_down, a_up)
        ctx.w0 = w0  # the 4-bit parameter itself (frozen, already alive): dequantized again in backward
        dtype = x.dtype
        weight = _dequantize(w0, dtype) * (a_down @ a_up).to(dtype)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a_down, a_up = ctx.saved_tensors
        dtype = x.dtype
        w0 = _dequantize(ctx.w0, dtype)
        grad = grad.to(dtype)
        grad_x = grad_down = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ (w0 * (a_down @ a_up).to(dtype))
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            grad_a = (flat_grad.T @ flat_x).to(a_down.dtype) * w0.to(a_down.dtype)  # dL/dA, (out, in)
            grad_down = grad_a @ a_up.T if ctx.needs_input_grad[1] else None
            grad_up = a_down.T @ grad_a if ctx.needs_input_grad[2] else None
        return grad_x, grad_down, grad_up, None


def _dequantize(weight: nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes 4-bit weight as a dense ``(out, in)`` tensor of ``dtype``."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


def support(option: str, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A matrix-shaped support tensor (broadcastable to the weight): ``lora_R``, ``vector`` or ``scalar``."""
    if option.startswith("lora"):
        k = _rank(option)
        return down[:, :k] @ up[:k]
    if option == "vector":
        return down[:, :1]
    if option == "scalar":
        return down[0, 0]
    raise ValueError(f"no support tensor for option {option!r}")


def bias_support(option: str, values: torch.Tensor) -> torch.Tensor:
    """D or E (stored as a column): ``vector`` (per output) or ``scalar`` (the first entry)."""
    return values[:, 0] if option == "vector" else values[0, 0]


def search_space(layer: GloraSupernet, ranks: list[int], new_biases: bool = True) -> dict[str, list[str]]:
    """The options of each support tensor of ``layer``.

    D scales the base bias, so a layer without one offers only ``none``; without ``new_biases`` such a layer
    offers no C or E either (a merge would otherwise give it a bias).
    """
    loras = [f"lora_{r}" for r in ranks]
    bias_paths = layer.has_bias or new_biases
    return {
        "A": [*loras, "vector", "scalar", "none"],
        "B": [*loras, "vector", "scalar", "none"],
        "C": [*loras, "vector", "none"] if bias_paths else ["none"],
        "D": ["vector", "scalar", "none"] if layer.has_bias else ["none"],
        "E": ["vector", "scalar", "none"] if bias_paths else ["none"],
    }


def choice_params(choice: Choice, n_out: int, n_in: int) -> int:
    """Adapter parameters a choice uses (what the search's ``param_limit`` counts)."""
    count = 0
    for option, rows in ((choice.A, n_out), (choice.B, n_out)):
        count += (
            _rank(option) * (rows + n_in) if option.startswith("lora") else {"vector": rows, "scalar": 1}.get(option, 0)
        )
    count += _rank(choice.C) * (n_in + 1) if choice.C.startswith("lora") else n_in if choice.C == "vector" else 0
    for option in (choice.D, choice.E):
        count += {"vector": n_out, "scalar": 1}.get(option, 0)
    return count


def glora_modules(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """The PEFT LoRA layers of ``model`` that are GLoRA layers, by name inside the base model."""
    return {
        user_name(name): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A")
        and isinstance(module.lora_A, nn.ModuleDict)
        and isinstance(module.lora_A[adapter_name] if adapter_name in module.lora_A else None, GloraSupernet)
    }


def install_glora(model: nn.Module, config: GloraConfig) -> dict[str, dict[str, list[str]]]:
    """Turn every LoRA layer of ``config.adapter_name`` into a GLoRA layer; returns each layer's search space.

    The weights are stored at the LoRA ``r``, in float32 (or the LoRA weights' dtype if wider). Call before the
    optimizer is built, so it holds the new parameters.

    Raises:
        ValueError: a rank in ``config.ranks`` exceeds the LoRA ``r`` of some layer; the adapter wraps parameters
            (``target_parameters``: PEFT's ``ParamWrapper``, e.g. fused MoE experts).
    """
    adapter = config.adapter_name
    layers = lora_modules(model, adapter)
    if any(isinstance(layer, ParamWrapper) for layer in layers.values()):
        raise ValueError(wrapped_parameters_refusal(model.peft_config[adapter].target_parameters))
    spaces = {}
    for name, layer in layers.items():
        linear_a = layer.lora_A[adapter]
        rank = linear_a.out_features
        ranks = sorted(set(config.ranks or [rank]))
        if ranks[-1] > rank:
            raise ValueError(f"glora.ranks: {ranks[-1]} exceeds the LoRA r ({rank}) the weights are stored at")
        # at least float32: TRL casts a 4-bit base's LoRA weights to bfloat16, and in bfloat16 the full-size
        # W0 (.) A x and b 1^T x paths moved the logits by 2e-2 from the float64 merge after a short run
        dtype = torch.promote_types(linear_a.weight.dtype, torch.float32)
        supernet = GloraSupernet(
            layer.get_base_layer(),
            rank,
            dtype=dtype,
            device=linear_a.weight.device,
            fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
        )
        layer.lora_A[adapter], layer.lora_B[adapter] = supernet, nn.Identity()
        layer.scaling[adapter] = 1.0  # GLoRA has no LoRA scaling
        spaces[name] = search_space(supernet, ranks, config.new_biases)
    return spaces


def wrapped_parameters_refusal(target_parameters: Any) -> str:
    """Why GLoRA refuses an adapter that wraps parameters, naming the setting and what to do instead.

    GLoRA's support tensors act on a linear layer (its input for ``W0 C``, its bias for D and E, the layer's
    forward for all of them); PEFT adapts a wrapped parameter (a fused 3-D expert stack, a router weight) as a bare
    weight delta, with no layer input, bias or per-expert merge for the supernet to use.
    """
    value = sorted(target_parameters or [])
    return (
        f"target_parameters: {value} is not supported by method 'glora' (its support tensors act on a linear "
        "layer's input, output and bias; PEFT adapts these parameters, e.g. MoE experts and routers, as a bare weight "
        "delta); leave target_parameters empty and name linear layers in target_modules (on an MoE model PEFT turns "
        "'all-linear' into expert target_parameters)"
    )


def sample_choices(spaces: dict[str, dict[str, list[str]]], rng: random.Random) -> dict[str, Choice]:
    """One uniformly drawn choice per layer (each support tensor independently)."""
    return {name: Choice(*(rng.choice(space[t]) for t in TENSORS)) for name, space in spaces.items()}


def fix_choices(model: nn.Module, choices: dict[str, Choice], adapter_name: str = "default") -> None:
    """Set every GLoRA layer's choice (``choices`` by layer name)."""
    layers = glora_modules(model, adapter_name)
    missing = sorted(set(layers) - set(choices))
    if missing:
        raise ValueError(f"no choice for GLoRA layer {missing[0]} ({len(missing)} layers without one)")
    for name, layer in layers.items():
        layer.lora_A[adapter_name].choice = Choice(*choices[name])
