"""The other seed methods, on the same PEFT LoRA layers: cLA, random cLA, c3LA, random c3LA."""

from .cla import collapse_cla, install_cla
from .cla_callback import ClaCallback

__all__ = ["ClaCallback", "collapse_cla", "install_cla"]
