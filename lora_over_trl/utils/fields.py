"""Helpers the methods' configs share: PEFT's module matching, checked construction from a dict, run phases."""

from __future__ import annotations

import re
from difflib import get_close_matches
from typing import Any

__all__ = ["from_dict", "is_fraction", "is_number", "layer_index", "module_matches", "phase_problems", "resolve_phase"]

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def module_matches(name: str, target_modules: str | list[str]) -> bool:
    """PEFT's matching rule: a string is a regex that must match the whole name; a list matches by suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)``, with unknown keys reported by name and nearest valid key."""
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        hints = [
            f"{key!r} (did you mean {close[0]!r}?)" if (close := get_close_matches(key, known, n=1)) else repr(key)
            for key in unknown
        ]
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(hints)}; allowed: {sorted(known)}")
    return cls(**values)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_fraction(value: Any) -> bool:
    """A schedule phase given as a share of the run: a float in [0, 1)."""
    return isinstance(value, float) and 0 <= value < 1


def phase_problems(name: str, value: Any, minimum: int) -> list[str]:
    """A schedule phase is an integer number of steps (>= ``minimum``) or a fraction of the run in [0, 1)."""
    if (isinstance(value, int) and not isinstance(value, bool) and value >= minimum) or is_fraction(value):
        if not (minimum == 1 and value == 0.0):
            return []
    low = "(0, 1)" if minimum == 1 else "[0, 1)"
    return [f"`{name}` must be an integer >= {minimum} (steps) or a fraction of the run in {low}, got {value!r}"]


def resolve_phase(value: int | float, total: int, minimum: int = 0) -> int:
    """Steps (or epochs) of a phase: an integer as given, a fraction of ``total`` rounded down, at least ``minimum``.

    >>> resolve_phase(0.1, 32), resolve_phase(5, 32), resolve_phase(0.05, 10, minimum=1)
    (3, 5, 1)
    """
    return max(minimum, int(value * total) if is_fraction(value) else int(value))


def layer_index(name: str) -> int | None:
    """The first integer path component of a module name (``model.layers.3.mlp`` -> 3), or ``None``."""
    match = _LAYER_INDEX.search(name + ".")
    return int(match.group(1)) if match else None
