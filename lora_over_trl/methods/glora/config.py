"""What the user asks of GLoRA: the search space of support tensors and the evolutionary search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_over_trl.utils.fields import from_dict

__all__ = ["GloraConfig"]


@dataclass
class GloraConfig:
    """GLoRA (arXiv 2306.07967): generalized support tensors, a supernet, and an evolutionary search.

    Per layer ``y = (W0 + W0 (.) A + B) x + b0 + b0 (.) D + E + W0 C``. Each support tensor has choices
    (A, B: ``lora_R`` for each rank R in ``ranks``, ``vector``, ``scalar``, ``none``; C: ``lora_R``, ``vector``,
    ``none``; D, E: ``vector``, ``scalar``, ``none``), all sharing one set of stored weights. Training samples
    a choice per layer each step; the search then picks one per layer by held-out fitness, one-shot.

    Args:
        ranks: the LoRA ranks on offer (each <= the LoRA ``r`` the weights are stored at); ``None``: ``[r]``.
        seed: seed of the per-step choices and of the search; every process agrees.
        population: candidates per generation (the paper: 50).
        generations: search generations (20).
        top_k: candidates kept as parents (10).
        mutation_count: children by mutation per generation (25).
        crossover_count: children by crossover per generation (25).
        mutation_prob: chance that a mutation redraws one support tensor of one layer (0.2).
        param_limit: candidates with more adapter parameters than this are rejected; ``None``: no limit.
        search_batches: held-out batches each candidate is scored on.
        search_fraction: share of the training data held out for the search when no eval split is given
            (used by the SFT command).
        new_biases: allow C and E (and so a new bias) on layers without one; a merged Llama then has
            ``attention_bias`` / ``mlp_bias`` set.
        adapter_name: the PEFT adapter whose layers become GLoRA layers.

    Raises:
        ValueError: listing every invalid field at once.
    """

    ranks: list[int] | None = None
    seed: int = 0
    population: int = 50
    generations: int = 20
    top_k: int = 10
    mutation_count: int = 25
    crossover_count: int = 25
    mutation_prob: float = 0.2
    param_limit: int | None = None
    search_batches: int = 8
    search_fraction: float = 0.05
    new_biases: bool = True
    adapter_name: str = "default"

    def __post_init__(self) -> None:
        problems = []
        if self.ranks is not None and (
            not isinstance(self.ranks, list | tuple)
            or not self.ranks
            or not all(isinstance(r, int) and r >= 1 for r in self.ranks)
        ):
            problems.append(f"`ranks` must be a non-empty list of integers >= 1 or None, got {self.ranks!r}")
        for name in ("population", "generations", "top_k", "search_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"`{name}` must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("mutation_count", "crossover_count"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"`{name}` must be an integer >= 0, got {getattr(self, name)!r}")
        if isinstance(self.top_k, int) and isinstance(self.population, int) and self.top_k > self.population:
            problems.append(f"`top_k` ({self.top_k}) must not exceed `population` ({self.population})")
        if not isinstance(self.mutation_prob, int | float) or not 0 <= self.mutation_prob <= 1:
            problems.append(f"`mutation_prob` must be in [0, 1], got {self.mutation_prob!r}")
        if self.param_limit is not None and (not isinstance(self.param_limit, int) or self.param_limit < 0):
            problems.append(f"`param_limit` must be an integer >= 0 or None, got {self.param_limit!r}")
        if not isinstance(self.search_fraction, int | float) or not 0 < self.search_fraction < 1:
            problems.append(f"`search_fraction` must be in (0, 1), got {self.search_fraction!r}")
        if problems:
            raise ValueError("invalid GloraConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GloraConfig:
        """Build from a plain dict (YAML, JSON); unknown keys are an error naming them."""
        return from_dict(cls, values)
