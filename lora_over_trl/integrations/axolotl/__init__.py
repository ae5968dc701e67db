"""The Axolotl plugin: ``plugins: [lora_over_trl.integrations.axolotl.LoraOverPlugin]`` in an Axolotl YAML.

``LoraOverPlugin`` is imported on first use: the keys and their checks (``args``) import without Axolotl.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LoraOverPlugin"]


def __getattr__(name: str) -> Any:
    if name == "LoraOverPlugin":
        from lora_over_trl.integrations.axolotl.plugin import LoraOverPlugin

        return LoraOverPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
