"""Capacity scheduling: which LoRA modules are over-parameterized, decided from statistics (pure functions)."""

from lora_over_trl.lora_over.schedule.allocate import allocate, allocate_levels, module_type
from lora_over_trl.lora_over.schedule.importance import SensitivityTracker

__all__ = ["SensitivityTracker", "allocate", "allocate_levels", "module_type"]
