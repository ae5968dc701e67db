"""A test-only Axolotl plugin for ``benches/checks/check_axolotl.py``: what the trained model computed, and how fast.

Listed after ``LoraOverPlugin`` in the check's YAML (``benches/checks/`` on ``PYTHONPATH``), it puts its callback first
in the Trainer, so at ``on_train_end`` it records the logits of the model exactly as trained (LoRA-Over's
cores, cLA's chain), before the method's own callback collapses it. It also records each optimizer step's
wall and CPU time. Both go to ``$AXOLOTL_PROBE_OUT`` (a ``.pt`` file), read back by the check.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

PROBE_IDS = torch.arange(3, 3 + 2 * 24).reshape(2, 24)  # two fixed rows of token ids inside any vocabulary


class _Probe(TrainerCallback):
    def __init__(self, path: str) -> None:
        self.path = path
        self.step_seconds: list[float] = []
        # CPU seconds of this process (all its threads) per step: less swayed than wall time by other processes
        # on a shared machine
        self.step_cpu_seconds: list[float] = []
        self._started = self._cpu_started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started, self._cpu_started = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._started)
        self.step_cpu_seconds.append(time.process_time() - self._cpu_started)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            device = next(model.parameters()).device
            logits = model(input_ids=PROBE_IDS.to(device)).logits.float().cpu()
        model.train(was_training)
        torch.save(
            {
                "input_ids": PROBE_IDS,
                "logits": logits,
                "step_seconds": self.step_seconds,
                "step_cpu_seconds": self.step_cpu_seconds,
                "steps": state.global_step,
            },
            self.path,
        )


class ProbePlugin(BasePlugin):
    """Records the trained model's logits on :data:`PROBE_IDS` and the step times (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.probe: _Probe | None = None

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        self.probe = _Probe(os.environ["AXOLOTL_PROBE_OUT"])
        return [self.probe]

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        callbacks = trainer.callback_handler.callbacks
        callbacks.remove(self.probe)
        callbacks.insert(0, self.probe)  # before the method's callback: its on_train_end collapses
