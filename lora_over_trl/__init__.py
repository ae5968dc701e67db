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
    "keep_cpu_4bit_layout": "utils.bnb_cpu",
    "export_merged": "utils.export",
    "CapacityRule": "lora_over.config",
    "LoraOverConfig": "lora_over.config",
    "LoraOverCallback": "lora_over.callback",
    "load_lora_over": "lora_over.checkpoint",
    "save_lora_over": "lora_over.checkpoint",
    "apply_lora_over": "lora_over.model",
    "collapse": "lora_over.model",
    "over_parameterized_factors": "lora_over.model",
    "ClaConfig": "methods.cla.config",
    "ClaCallback": "methods.cla.callback",
    "GloraConfig": "methods.glora.config",
    "GloraCallback": "methods.glora.callback",
    "search_glora": "methods.glora.callback",
    "export_glora": "methods.glora.export",
    "export_glora_lora": "methods.glora.export",
}

if TYPE_CHECKING:
    from lora_over_trl.lora_over.callback import LoraOverCallback
    from lora_over_trl.lora_over.checkpoint import load_lora_over, save_lora_over
    from lora_over_trl.lora_over.config import CapacityRule, LoraOverConfig
    from lora_over_trl.lora_over.model import apply_lora_over, collapse, over_parameterized_factors
    from lora_over_trl.methods.cla.callback import ClaCallback
    from lora_over_trl.methods.cla.config import ClaConfig
    from lora_over_trl.methods.glora.callback import GloraCallback, search_glora
    from lora_over_trl.methods.glora.config import GloraConfig
    from lora_over_trl.methods.glora.export import export_glora, export_glora_lora
    from lora_over_trl.utils.bnb_cpu import keep_cpu_4bit_layout
    from lora_over_trl.utils.export import export_merged


def __getattr__(name: str) -> Any:
    if name not in _HOME:  # a subpackage (`lora_over_trl.sft`), as an eager package would have had it
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

__version__ = "0.2.0"
