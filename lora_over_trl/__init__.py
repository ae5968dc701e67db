"""lora-over-trl: LoRA-Over (over-parameterized LoRA factors) for the Hugging Face fine-tuning stack.

Example:
    >>> from lora_over_trl import LoraOverConfig, apply_lora_over, collapse
    >>> apply_lora_over(peft_model, LoraOverConfig(capacity=1.0))   # train as usual afterwards
    >>> collapse(peft_model)
    >>> peft_model.save_pretrained("out")                            # a standard PEFT LoRA adapter
"""

from .bnb_cpu import keep_cpu_4bit_layout
from .callback import LoraOverCallback
from .checkpoint import load_lora_over, save_lora_over
from .config import CapacityRule, ClaConfig, GloraConfig, LoraOverConfig
from .export import export_merged
from .methods import ClaCallback, GloraCallback, export_glora, export_glora_lora, search_glora
from .patch import (
    apply_lora_over,
    collapse,
    over_parameterized_factors,
)

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
