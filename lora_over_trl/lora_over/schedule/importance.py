"""Importance of LoRA modules measured during training: AdaLoRA's smoothed sensitivity.

For a module with factors ``A`` and ``B`` the sensitivity at step ``t`` is ``s_t = sum |W * dL/dW|`` over both
factor weights ``W`` (a first-order estimate of the loss change if the weight were removed; Molchanov et al.,
2019; Zhang et al., 2023, AdaLoRA). Smoothed as in AdaLoRA:

    I_t = beta1 * I_{t-1} + (1 - beta1) * s_t            (sensitivity, EMA)
    U_t = beta2 * U_{t-1} + (1 - beta2) * |s_t - I_t|    (uncertainty, EMA)
    score = I_t * U_t   (or I_t alone)

The state is plain floats, JSON-serializable, so it checkpoints with the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SensitivityTracker"]


@dataclass
class SensitivityTracker:
    """EMA of per-module sensitivity and of its uncertainty; ``scores()`` ranks modules."""

    beta1: float = 0.85
    beta2: float = 0.85
    uncertainty: bool = True
    sensitivity: dict[str, float] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)
    updates: int = 0

    def update(self, measured: dict[str, float]) -> None:
        """Fold one optimizer step's sensitivities in (modules first seen start from their value)."""
        for name, value in measured.items():
            previous = self.sensitivity.get(name, value)
            smoothed = self.beta1 * previous + (1 - self.beta1) * value
            self.spread[name] = self.beta2 * self.spread.get(name, 0.0) + (1 - self.beta2) * abs(value - smoothed)
            self.sensitivity[name] = smoothed
        self.updates += 1

    def scores(self) -> dict[str, float]:
        if not self.uncertainty:
            return dict(self.sensitivity)
        return {name: value * self.spread[name] for name, value in self.sensitivity.items()}

    def state_dict(self) -> dict:
        return {"sensitivity": self.sensitivity, "spread": self.spread, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.sensitivity = {k: float(v) for k, v in state["sensitivity"].items()}
        self.spread = {k: float(v) for k, v in state["spread"].items()}
        self.updates = int(state["updates"])
