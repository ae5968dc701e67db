"""Data-parallel (DDP) collectives for callbacks that decide or install parameters during a run.

Every function is a no-op without an initialized ``torch.distributed`` process group (one process), so callers
need no branch of their own.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["average_gradient", "mean_over_processes", "synchronize_new_parameters"]


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """The same statistics on every process (all-reduced mean), so every rank makes the same decision.

    Args:
        values: a float per name; every process passes the same names.

    Returns:
        ``values`` averaged over the processes, in float64 (``values`` itself without a process group).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    names = sorted(values)
    tensor = torch.tensor([values[n] for n in names], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.all_reduce(tensor)
    tensor /= torch.distributed.get_world_size()
    return dict(zip(names, tensor.cpu().tolist(), strict=True))


def synchronize_new_parameters(params: list[nn.Parameter]) -> None:
    """Average the gradients of parameters that started training after DDP wrapped the model.

    DDP only reduces what was trainable when it wrapped the model; a bank created later (the pre-pass) and
    plain weights coming back from a collapse are averaged here, by a hook after each accumulation into
    ``.grad`` (backward order is the same on every rank). A parameter gets the hook once, however often it is
    passed.

    Args:
        params: the parameters that joined the optimizer after DDP wrapped the model.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for param in params:
        if not getattr(param, "_lora_over_synchronized", False):
            param.register_post_accumulate_grad_hook(average_gradient)
            param._lora_over_synchronized = True


def average_gradient(param: nn.Parameter) -> None:
    """Replace ``param.grad`` by its mean over the processes (a post-accumulate-grad hook).

    Args:
        param: a parameter whose ``.grad`` was just accumulated.
    """
    torch.distributed.all_reduce(param.grad)
    param.grad /= torch.distributed.get_world_size()
