"""Keep an optimizer consistent with a model whose trainable parameters change during training.

Invariant after :func:`sync_optimizer`: every parameter group holds exactly the model's trainable
parameters that belong to it, in ``model.named_parameters()`` order. That is what a fresh ``Trainer``
builds from the same model, so an optimizer state saved after any number of changes loads positionally
into the optimizer of a resumed run. The number of groups never changes, so learning-rate schedulers
(one lambda per group) stay valid; new parameters join the group of the weights they replace and get
that group's learning rate and schedule.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["group_index", "sync_optimizer"]


def group_index(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> int | None:
    """The index of the group holding ``param``, or ``None``."""
    for index, group in enumerate(optimizer.param_groups):
        if any(p is param for p in group["params"]):
            return index
    return None


def sync_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, placement: dict[int, int] | None = None) -> None:
    """Drop parameters that left the model (or stopped training), add new ones, restore model order.

    Args:
        optimizer: the optimizer to fix in place (its state of dropped parameters is deleted); accelerate's
            ``AcceleratedOptimizer`` too, whose ``state`` and ``param_groups`` are the wrapped optimizer's.
        model: the model whose trainable parameters the optimizer must hold.
        placement: group index for each new parameter, by ``id``; unplaced new parameters go to group 0.
    """
    placement = placement or {}
    trainable = [p for _, p in model.named_parameters() if p.requires_grad]
    order = {id(p): i for i, p in enumerate(trainable)}
    held = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in order:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) in order]
    for p in trainable:
        if id(p) not in held:
            optimizer.param_groups[placement.get(id(p), 0)]["params"].append(p)
    for group in optimizer.param_groups:
        group["params"].sort(key=lambda p: order[id(p)])
