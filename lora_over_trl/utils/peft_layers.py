"""PEFT's LoRA layers of a model, by the names ``target_modules`` uses: what every method's code starts from."""

from __future__ import annotations

from peft.tuners.lora import LoraLayer
from torch import nn

__all__ = ["lora_modules", "user_name"]

_PEFT_PREFIX = "base_model.model."


def user_name(name: str) -> str:
    """Module names as PEFT's ``target_modules`` sees them (inside the base model)."""
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def lora_modules(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """Linear LoRA layers of ``model`` that carry ``adapter_name``, by name inside the base model."""
    return {
        user_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
        and adapter_name in module.lora_A
        and isinstance(module.lora_A[adapter_name], nn.Linear)
    }
