"""What the schedules measure on the model: each step's sensitivity ``sum |W * dL/dW|`` (dynamic) and the Fisher
information of a pre-pass (prepass), per LoRA module.

Both read ``dL/dW`` of the bank's contraction (the scheduled factors are all in the bank, plain ones as one core),
summed over the processes before anything is squared or multiplied: every rank then holds what one process
would measure on the whole global batch, and decides alike and as it would.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lora_over_trl.lora_over.model import FACTOR_NAMES, banks
from lora_over_trl.utils.collectives import processes, sum_over_processes

__all__ = ["SensitivityHooks", "fisher_scores"]


class SensitivityHooks:
    """Per-module ``sum |W * dL/dW|`` of each optimizer step, from one gradient hook per bank group.

    Args:
        adapter_name: the PEFT adapter whose factors are observed.
    """

    def __init__(self, adapter_name: str) -> None:
        self.adapter_name = adapter_name
        # bank group (its factor keys) -> dL/dW of its contraction, summed over the step's backward passes
        self.group_grads: dict[tuple[str, ...], torch.Tensor] = {}

    def observe(self, model: nn.Module) -> None:
        """Sum dL/dW of every bank group's contraction over the backward passes of a step (its micro-batches).

        Args:
            model: the PEFT model with its factors in the bank.
        """
        for bank in banks(model, self.adapter_name).values():
            bank.grad_observer = self._observe_group

    def measure(self, model: nn.Module) -> dict[str, float] | None:
        """This step's sensitivity per module, from the gradients averaged over the processes; they are dropped.

        Each process's gradient is that of its share of the step's loss, and data parallelism averages them into
        the step's gradient: the same average is taken here, so the statistic is the one a single process would
        compute on the whole batch (not a mean of per-process statistics).

        Args:
            model: the PEFT model, with the factors the step's gradients were taken on.

        Returns:
            ``{module: sum |W * dL/dW| over its factors}``, or ``None`` when no gradient was observed this step.
        """
        if not self.group_grads:
            return None
        current = {key: bank for bank in banks(model, self.adapter_name).values() for key in bank.layouts}
        groups = sorted(keys for keys in self.group_grads if all(key in current for key in keys))
        with torch.no_grad():
            grads = sum_over_processes([self.group_grads[keys] for keys in groups])
            per_factor: dict[str, torch.Tensor] = {}
            for keys, grad in zip(groups, grads, strict=True):
                weights = current[keys[0]].contract_group(keys)
                sums = (weights.float() * grad / processes()).abs().sum((1, 2))
                per_factor.update(zip(keys, sums.unbind(0), strict=True))
            names = sorted(per_factor)
            values = torch.stack([per_factor[k].cpu() for k in names]).tolist() if names else []
        self.group_grads.clear()
        measured: dict[str, float] = {}
        for key, value in zip(names, values, strict=True):
            name = key.rsplit(".", 1)[0]
            measured[name] = measured.get(name, 0.0) + value
        return measured or None

    def _observe_group(self, keys: list[str], grad: torch.Tensor) -> None:
        group = tuple(keys)
        held = self.group_grads.get(group)
        self.group_grads[group] = grad.detach().clone() if held is None else held.add_(grad.detach())


def fisher_scores(
    model: nn.Module, layers: dict[str, nn.Module], adapter_name: str, dataloader: Iterable, batches: int
) -> dict[str, float]:
    """Mean over ``batches`` global batches of the squared gradient of each module's LoRA weights.

    Each process runs its share of a batch with the loss normalized by the whole batch's target tokens, so the
    gradients summed over the processes are the whole batch's, and are squared only then: every rank gets what one
    process would on the global batch. Gradients come from ``torch.autograd.grad`` on the weights the forward
    read (the bank's contraction), not ``backward()``: nothing accumulates into ``.grad``, so DDP's and FSDP's
    gradient hooks stay out of it.

    Args:
        model: the model to run (the Trainer's, possibly wrapped); it is put in training mode.
        layers: the LoRA layers by module name.
        adapter_name: the PEFT adapter whose weights are scored.
        dataloader: the training batches (dicts of tensors, with ``labels``); the first ``batches`` are used.
        batches: how many batches to average over (``prepass_batches``).

    Returns:
        ``{module: Fisher information}`` for every module of ``layers``.
    """
    fisher = dict.fromkeys(layers, 0.0)
    model.train()
    seen = 0
    for batch in dataloader:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")}
        tokens = (inputs["labels"][..., 1:] != -100).sum().reshape(1)
        (total,) = sum_over_processes([tokens])
        loss = model(**inputs, num_items_in_batch=total.to(tokens.device)).loss
        # read after the forward: a banked factor's weight is then the forward's own slice of the contraction
        weights = {
            (name, attr): getattr(layer, attr)[adapter_name].weight
            for name, layer in sorted(layers.items())
            for attr in FACTOR_NAMES.values()
        }
        keys = [k for k, w in weights.items() if w.requires_grad]
        grads = torch.autograd.grad(loss, [weights[k] for k in keys], allow_unused=True)
        grads = [torch.zeros_like(weights[k]) if g is None else g for k, g in zip(keys, grads, strict=True)]
        grads = sum_over_processes(grads)
        for (name, _), grad in zip(keys, grads, strict=True):
            fisher[name] += float((grad.float() ** 2).sum())
        seen += 1
        if seen == batches:
            break
    return {n: v / max(seen, 1) for n, v in fisher.items()}
