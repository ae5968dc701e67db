"""What every method's callback shares: the error for a set-up that cannot run, and the resume hook."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

__all__ = ["ScheduleSetupError", "restore_before_load"]


class ScheduleSetupError(ValueError):
    """A schedule that cannot run on this model or run (raised before any training step)."""


def restore_before_load(model: nn.Module, restore: Callable[[Path], None]) -> None:
    """Make ``model.load_adapter`` run ``restore(checkpoint folder)`` first.

    On resume the Trainer loads the checkpoint's adapter weights before any callback event: a callback that
    changed the adapter's structure (cores, windows) rebuilds the recorded one here, so the weights fit it.
    """
    original = model.load_adapter

    def load_adapter(model_id, adapter_name, *args, **kwargs):
        restore(Path(model_id))
        return original(model_id, adapter_name, *args, **kwargs)

    model.load_adapter = load_adapter
