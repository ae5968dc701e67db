"""What the schedules measure on the model: each step's sensitivity ``sum |W * dL/dW|`` (dynamic) and the Fisher
information of a pre-pass (prepass), per LoRA module.

:class:`SensitivityHooks` takes ``dL/dW`` by hooks on the factor weights, summed over a step's micro-batches,
and reduces it to one float per module when the optimizer steps; :func:`fisher_scores` runs the pre-pass. Both
return statistics already averaged over the processes (:func:`lora_over_trl.utils.collectives.mean_over_processes`),
so every rank decides alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lora_over_trl.lora_over.model import FACTOR_NAMES, banks, factor_linears
from lora_over_trl.utils.collectives import mean_over_processes

__all__ = ["SensitivityHooks", "fisher_scores"]


class SensitivityHooks:
    """Per-module ``sum |W * dL/dW|`` of each optimizer step, from gradient hooks on one model's factors.

    Args:
        adapter_name: the PEFT adapter whose factors are observed.
    """

    def __init__(self, adapter_name: str) -> None:
        self.adapter_name = adapter_name
        # plain factor -> [W, sum of dL/dW so far] during a step's micro-batches; sum |W * dL/dW| after its last
        self.grads: dict[str, list[torch.Tensor] | torch.Tensor] = {}
        # bank group (its factor keys) -> dL/dW of its contraction, summed over the step's backward passes
        self.group_grads: dict[tuple[str, ...], torch.Tensor] = {}
        self.micro_batch, self.micro_batches = 0, 1

    def observe(self, model: nn.Module) -> None:
        """Sum dL/dW per factor over the micro-batches of a step: hooks on plain weights (a scalar per factor
        once the step's last micro-batch is in) and one hook per bank group on its contraction (summed there,
        reduced to a scalar per factor at :meth:`measure`). Call again after the factors moved.

        Args:
            model: the PEFT model with the factors as they are now.
        """
        adapter = self.adapter_name
        for bank in banks(model, adapter).values():
            bank.grad_observer = self._observe_group
        banked = {key for bank in banks(model, adapter).values() for key in bank.layouts}
        for key, linear in factor_linears(model, adapter).items():
            if key in banked:
                continue
            param = linear.weight
            if param.requires_grad and not getattr(param, "_lora_over_observed", False):  # hook kept for good
                param.register_hook(functools.partial(_accumulate, self.grads, self.last_micro_batch, key, param))
                param._lora_over_observed = True

    def step_begin(self, micro_batches: int) -> None:
        """A new optimizer step of ``micro_batches`` micro-batches (gradient accumulation steps) begins."""
        self.micro_batch, self.micro_batches = 0, micro_batches

    def substep_end(self) -> None:
        """One micro-batch of the step, not its last, is done."""
        self.micro_batch += 1

    def last_micro_batch(self) -> bool:
        """Whether the backward pass now running is the step's last."""
        return self.micro_batch >= self.micro_batches - 1

    def measure(self, model: nn.Module) -> dict[str, float] | None:
        """This step's sensitivity per module (averaged over the processes); the held gradients are dropped.

        Args:
            model: the PEFT model, with the factors the step's gradients were taken on.

        Returns:
            ``{module: sum |W * dL/dW| over its factors}``, or ``None`` when no gradient was observed this step.
        """
        if not (self.grads or self.group_grads):
            return None
        with torch.no_grad():
            per_factor = {k: _sensitivity(v) for k, v in self.grads.items()} | self._group_sensitivities(model)
            keys = sorted(per_factor)
            sums = torch.stack([per_factor[k].cpu() for k in keys])
        measured: dict[str, float] = {}
        for key, value in zip(keys, sums.tolist(), strict=True):
            name = key.rsplit(".", 1)[0]
            measured[name] = measured.get(name, 0.0) + value
        self.grads.clear()
        return mean_over_processes(measured)

    def _observe_group(self, keys: list[str], grad: torch.Tensor) -> None:
        group = tuple(keys)
        held = self.group_grads.get(group)
        self.group_grads[group] = grad.detach().clone() if held is None else held.add_(grad.detach())

    def _group_sensitivities(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``sum |W * dL/dW|`` of every banked factor, from the summed gradients of its group's contraction."""
        found: dict[str, torch.Tensor] = {}
        current = {key: bank for bank in banks(model, self.adapter_name).values() for key in bank.layouts}
        for keys, grad in self.group_grads.items():
            if not all(key in current for key in keys):
                continue
            weights = current[keys[0]].contract_group(keys)
            found.update(zip(keys, (weights * grad).abs().sum((1, 2)).float().unbind(0), strict=True))
        self.group_grads.clear()
        return found


def fisher_scores(
    model: nn.Module, layers: dict[str, nn.Module], adapter_name: str, dataloader: Iterable, batches: int
) -> dict[str, float]:
    """Mean over ``batches`` batches of the squared gradient of each module's LoRA weights (averaged over the
    processes).

    Gradients come from ``torch.autograd.grad``, not ``backward()``: nothing accumulates into ``.grad``,
    so DDP's gradient hooks (on the parameters themselves, wrapped or not) stay out of it.

    Args:
        model: the model to run (the Trainer's, possibly DDP-wrapped); it is put in training mode.
        layers: the LoRA layers by module name.
        adapter_name: the PEFT adapter whose weights are scored.
        dataloader: the training batches (dicts of tensors); the first ``batches`` are used.
        batches: how many batches to average over (``prepass_batches``).

    Returns:
        ``{module: Fisher information}`` for every module of ``layers``.
    """
    weights = {
        (name, attr): getattr(layer, attr)[adapter_name].weight
        for name, layer in layers.items()
        for attr in FACTOR_NAMES.values()
    }
    keys = [k for k, w in weights.items() if w.requires_grad]
    fisher = dict.fromkeys(layers, 0.0)
    model.train()
    seen = 0
    for batch in dataloader:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")}
        loss = model(**inputs).loss
        grads = torch.autograd.grad(loss, [weights[k] for k in keys], allow_unused=True)
        for (name, _), grad in zip(keys, grads, strict=True):
            fisher[name] += 0.0 if grad is None else float((grad.float() ** 2).sum())
        seen += 1
        if seen == batches:
            break
    return mean_over_processes({n: v / max(seen, 1) for n, v in fisher.items()})


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
