"""Capacity scheduling: which LoRA modules are over-parameterized, decided from statistics (pure functions)."""

from .allocate import allocate, allocate_levels, module_type
from .importance import SensitivityTracker

__all__ = ["SensitivityTracker", "allocate", "allocate_levels", "module_type"]
