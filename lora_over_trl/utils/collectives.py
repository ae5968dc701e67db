"""Collectives for callbacks that decide during a run, so that every process decides alike.

Every function is a no-op without an initialized ``torch.distributed`` process group (one process), so callers
need no branch of their own.
"""

from __future__ import annotations

import torch

__all__ = ["processes", "sum_over_processes"]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def processes() -> int:
    """The number of processes in the default group (1 without one)."""
    return torch.distributed.get_world_size() if _distributed() else 1


def sum_over_processes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sum of each tensor over the processes, in one all-reduce of their concatenation.

    Every process passes tensors of the same shapes in the same order (backward runs in the same order on every
    rank, and callers sort what they collect). Used on gradients of a process's share of a global batch, whose sum
    is the gradient one process would get on the whole batch.

    Args:
        tensors: tensors of any shapes, on one device.

    Returns:
        New tensors (float32 at least), summed; copies of ``tensors`` without a process group.
    """
    if not tensors:
        return []
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    if processes() > 1:
        if torch.distributed.get_backend() == "nccl" and not flat.is_cuda:
            flat = flat.cuda()
        torch.distributed.all_reduce(flat)
    pieces = torch.split(flat.to(tensors[0].device), [t.numel() for t in tensors])
    return [piece.view(t.shape) for piece, t in zip(pieces, tensors, strict=True)]
