"""What the user asks of the cLA family: which variant, and how often a chain moves its window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_over_trl.utils.fields import from_dict, phase_problems

__all__ = ["ClaConfig", "CLA_METHODS"]

CLA_METHODS = ("cla", "rcla", "c3la", "rc3la")
_CHAIN_UNITS = ("steps", "epochs")


@dataclass
class ClaConfig:
    """cLA and its variants (Beyond LoRA, arXiv 2606.13767): ``A`` is a fixed window of ``r`` input columns.

    Only ``B`` trains; ``A x`` is a gather of ``r`` input features, not a matmul. ``cla`` takes the window at
    offset 0, ``rcla`` at a seeded random offset per module. ``c3la`` chains windows: every ``chain_interval``
    steps (or epochs) the current ``B A`` joins a frozen low-rank part, the window moves on (offsets 0, r, 2r,
    ..., wrapping) and ``B`` restarts at zero; ``rc3la`` visits the windows in a seeded random order. The
    result is a standard PEFT LoRA adapter of rank ``windows visited x r``.

    Args:
        method: ``"cla"``, ``"rcla"``, ``"c3la"`` or ``"rc3la"``.
        chain_interval: c3la/rc3la: optimizer steps (or epochs, see ``chain_unit``) per window; a float below 1
            is a fraction of the run (its ``max_steps``, or its epochs), resolved when training starts. The
            default, a quarter of the run, visits four windows: a collapsed adapter of rank ``4 r``, where a fixed
            step count would make the rank grow with the run's length.
        chain_unit: ``"steps"`` or ``"epochs"``.
        seed: seed of the random offsets (rcla) and window orders (rc3la); every process agrees.
        adapter_name: the PEFT adapter to turn into cLA.
        collapse_on_train_end: write the frozen chain into plain LoRA weights at ``on_train_end``.

    Raises:
        ValueError: listing every invalid field at once.
    """

    method: str = "cla"
    chain_interval: int | float = 0.25
    chain_unit: str = "steps"
    seed: int = 0
    adapter_name: str = "default"
    collapse_on_train_end: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.method not in CLA_METHODS:
            problems.append(f"`method` must be one of {CLA_METHODS}, got {self.method!r}")
        problems += phase_problems("chain_interval", self.chain_interval, minimum=1)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            problems.append(f"`seed` must be an integer >= 0, got {self.seed!r}")
        if self.chain_unit not in _CHAIN_UNITS:
            problems.append(f"`chain_unit` must be one of {_CHAIN_UNITS}, got {self.chain_unit!r}")
        if problems:
            raise ValueError("invalid ClaConfig: " + "; ".join(problems))

    @property
    def chained(self) -> bool:
        """Whether windows move during training (c3la, rc3la)."""
        return self.method in ("c3la", "rc3la")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClaConfig:
        """Build from a plain dict (YAML, JSON); unknown keys are an error naming them."""
        return from_dict(cls, values)
