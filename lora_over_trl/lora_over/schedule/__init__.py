"""Capacity scheduling: which LoRA modules are over-parameterized, decided from statistics (pure functions), and the
``CapacityScheduler`` state machine that holds a run's budget, allocation and history (no Trainer, no model)."""

from lora_over_trl.lora_over.schedule.allocate import allocate, allocate_levels, module_type
from lora_over_trl.lora_over.schedule.importance import SensitivityTracker
from lora_over_trl.lora_over.schedule.scheduler import CapacityScheduler

__all__ = ["CapacityScheduler", "SensitivityTracker", "allocate", "allocate_levels", "module_type"]
