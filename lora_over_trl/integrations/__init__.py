"""Integrations with other fine-tuning stacks: ``lora_over_trl.integrations.axolotl.LoraOverPlugin`` (Axolotl).

Nothing is imported here: each integration imports its host library itself, so ``lora_over_trl`` imports
without any of them installed.
"""
