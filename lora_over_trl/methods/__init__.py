"""The other seed methods, on the same PEFT LoRA layers: cLA, random cLA, c3LA, random c3LA, and GLoRA."""

from .cla import collapse_cla, install_cla
from .cla_callback import ClaCallback
from .glora import Choice, fix_choices, install_glora
from .glora_callback import GloraCallback, search_glora
from .glora_export import export_glora, export_glora_lora

__all__ = [
    "Choice",
    "ClaCallback",
    "GloraCallback",
    "collapse_cla",
    "export_glora",
    "export_glora_lora",
    "fix_choices",
    "install_cla",
    "install_glora",
    "search_glora",
]
