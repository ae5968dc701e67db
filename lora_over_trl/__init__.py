"""lora-over-trl: LoRA-Over (over-parameterized LoRA factors) for the Hugging Face fine-tuning stack.

Example:
    >>> from lora_over_trl import LoraOverConfig, apply_lora_over, collapse
    >>> apply_lora_over(peft_model, LoraOverConfig(capacity=1.0))   # train as usual afterwards
    >>> collapse(peft_model)
    >>> peft_model.save_pretrained("out")                            # a standard PEFT LoRA adapter
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public names, imported on first use: the commands (`lora-over-trl eval --tasks_dir`, `--help`) and a plain
# `import lora_over_trl` then start in well under a second instead of importing PEFT, TRL and transformers.
_HOME = {
    "keep_cpu_4bit_layout": "bnb_cpu",
    "LoraOverCallback": "callback",
    "load_lora_over": "checkpoint",
    "save_lora_over": "checkpoint",
    "CapacityRule": "config",
    "ClaConfig": "config",
    "GloraConfig": "config",
    "LoraOverConfig": "config",
    "export_merged": "export",
    "ClaCallback": "methods",
    "GloraCallback": "methods",
    "export_glora": "methods",
    "export_glora_lora": "methods",
    "search_glora": "methods",
    "apply_lora_over": "patch",
    "collapse": "patch",
    "over_parameterized_factors": "patch",
}

if TYPE_CHECKING:
    from .bnb_cpu import keep_cpu_4bit_layout
    from .callback import LoraOverCallback
    from .checkpoint import load_lora_over, save_lora_over
    from .config import CapacityRule, ClaConfig, GloraConfig, LoraOverConfig
    from .export import export_merged
    from .methods import ClaCallback, GloraCallback, export_glora, export_glora_lora, search_glora
    from .patch import apply_lora_over, collapse, over_parameterized_factors


def __getattr__(name: str) -> Any:
    if name not in _HOME:  # a submodule (`lora_over_trl.patch`), as an eager package would have had it
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":  # the submodule exists; something it imports does not
                raise
            raise AttributeError(f"module 'lora_over_trl' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])


__all__ = [
    "CapacityRule",
    "ClaCallback",
    "ClaConfig",
    "GloraCallback",
    "GloraConfig",
    "LoraOverCallback",
    "LoraOverConfig",
    "apply_lora_over",
    "collapse",
    "export_glora",
    "export_glora_lora",
    "export_merged",
    "keep_cpu_4bit_layout",
    "load_lora_over",
    "over_parameterized_factors",
    "save_lora_over",
    "search_glora",
]

__version__ = "0.1.0"
