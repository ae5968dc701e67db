"""GLoRA's evolutionary search over per-layer choices (one-shot: the supernet is not retrained).

As in the paper's code (after AutoFormer): a random legal population; each generation keeps the ``top_k``
best seen so far as parents, makes ``mutation_count`` children by redrawing each support tensor of each
layer with ``mutation_prob``, ``crossover_count`` children by taking each layer from one of two parents,
and refills the population at random. A candidate is legal when it is new and within ``param_limit``;
every candidate is scored once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from lora_over_trl.methods.glora.config import GloraConfig
from lora_over_trl.methods.glora.model import TENSORS, Choice, sample_choices

__all__ = ["SearchResult", "evolutionary_search"]

logger = logging.getLogger(__name__)

Candidate = tuple[Choice, ...]  # one choice per layer, in the order of the spaces


@dataclass
class SearchResult:
    """The chosen configuration and how the search got there."""

    choices: dict[str, Choice]
    fitness: float
    params: int
    history: list[dict] = field(default_factory=list)  # per generation: best fitness so far, evaluations
    evaluations: int = 0

    def to_dict(self) -> dict:
        return {
            "fitness": self.fitness,
            "params": self.params,
            "evaluations": self.evaluations,
            "history": self.history,
            "choices": {name: choice._asdict() for name, choice in self.choices.items()},
        }


def evolutionary_search(
    spaces: dict[str, dict[str, list[str]]],
    fitness: Callable[[dict[str, Choice]], float],
    params: Callable[[dict[str, Choice]], int],
    config: GloraConfig,
    progress: Callable[[dict], None] | None = None,
) -> SearchResult:
    """Search per-layer choices that maximize ``fitness`` (e.g. minus the held-out loss).

    Args:
        spaces: each layer's options per support tensor (:func:`~lora_over_trl.methods.glora.model.search_space`).
        fitness: scores a configuration; higher is better.
        params: adapter parameters of a configuration (checked against ``config.param_limit``).
        config: population, generations, top_k, mutation_count, crossover_count, mutation_prob, param_limit, seed.
        progress: called after each generation with that generation's record.

    Raises:
        ValueError: no legal candidate can be found (``param_limit`` below every configuration tried).
    """
    names = list(spaces)
    rng = random.Random(f"glora-search:{config.seed}")
    scores: dict[Candidate, float] = {}

    def as_dict(candidate: Candidate) -> dict[str, Choice]:
        return dict(zip(names, candidate, strict=True))

    def legal(candidate: Candidate) -> bool:
        if candidate in scores:
            return False
        return config.param_limit is None or params(as_dict(candidate)) <= config.param_limit

    def score(candidates: list[Candidate]) -> None:
        for candidate in candidates:
            scores[candidate] = float(fitness(as_dict(candidate)))

    def collect(make: Callable[[], Candidate], count: int, tries: int) -> list[Candidate]:
        found: list[Candidate] = []
        for _ in range(tries):
            if len(found) == count:
                break
            candidate = make()
            if legal(candidate) and candidate not in found:
                found.append(candidate)
        return found

    def random_candidate() -> Candidate:
        return tuple(sample_choices(spaces, rng).values())

    def mutate(parents: list[Candidate]) -> Candidate:
        parent = rng.choice(parents)
        return tuple(
            Choice(
                *(
                    rng.choice(spaces[name][t]) if rng.random() < config.mutation_prob else getattr(choice, t)
                    for t in TENSORS
                )
            )
            for name, choice in zip(names, parent, strict=True)
        )

    def cross(parents: list[Candidate]) -> Candidate:
        first, second = rng.choice(parents), rng.choice(parents)
        return tuple(rng.choice(pair) for pair in zip(first, second, strict=True))

    population = collect(random_candidate, config.population, tries=config.population * 10)
    if not population:
        raise ValueError(f"glora.param_limit: no configuration within {config.param_limit} parameters was found")
    score(population)
    history: list[dict] = []
    for generation in range(config.generations):
        ranked = sorted(scores, key=scores.__getitem__, reverse=True)
        parents = ranked[: config.top_k]
        record = {
            "generation": generation,
            "best_fitness": scores[parents[0]],
            "top_k_mean": sum(scores[p] for p in parents) / len(parents),
            "evaluations": len(scores),
        }
        history.append(record)
        logger.info(
            "GLoRA search generation %d: best fitness %.6g (%d scored)",
            generation,
            record["best_fitness"],
            record["evaluations"],
        )
        if progress is not None:
            progress(record)
        if generation == config.generations - 1:
            break
        children = collect(partial(mutate, parents), config.mutation_count, tries=config.mutation_count * 10)
        children += collect(partial(cross, parents), config.crossover_count, tries=config.crossover_count * 10)
        children = list(dict.fromkeys(children))
        refill = max(config.population - len(children), 0)
        children += [c for c in collect(random_candidate, refill, tries=refill * 10) if c not in children]
        score(children)
    best = max(scores, key=scores.__getitem__)
    return SearchResult(
        choices=as_dict(best),
        fitness=scores[best],
        params=params(as_dict(best)),
        history=history,
        evaluations=len(scores),
    )
