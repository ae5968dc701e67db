"""What the analyses read: a run's adapter folder, its LoRA updates, and a base checkpoint's weights one at a time."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lora_over_trl.utils.errors import first_line

__all__ = ["AnalysisError", "BaseWeights", "adapter_folder", "adapter_updates"]


class AnalysisError(ValueError):
    """Bad input: reported as one line, exit code 2."""


def adapter_folder(path: Path) -> Path:
    """The PEFT adapter folder in ``path`` (itself or its ``adapter/``)."""
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            if (candidate / "lora_over.json").is_file():
                raise AnalysisError(
                    f"{candidate} is an over-parameterized training checkpoint; analyze the run's adapter/"
                )
            return candidate
    raise AnalysisError(f"{path}: no adapter_config.json in it or in its adapter/ folder")


def adapter_updates(folder: Path, pattern: str | None) -> tuple[dict[str, Any], dict[str, tuple]]:
    """``(adapter config, {module: (B, A, scaling)})`` from a PEFT LoRA adapter folder."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise AnalysisError(f"{folder}: a {config.get('peft_type')} adapter; only LoRA adapters are analyzed")
    weights = load_file(folder / "adapter_model.safetensors")
    updates = {}
    for key, a in weights.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        if pattern and not re.search(pattern, module):
            continue
        b = weights[key.replace("lora_A", "lora_B")]
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        updates[module] = (b.float(), a.float(), alpha / (r**0.5 if config.get("use_rslora") else r))
    if not updates:
        raise AnalysisError(f"{folder}: no LoRA module" + (f" matches --modules {pattern!r}" if pattern else ""))
    return config, dict(sorted(updates.items(), key=lambda item: _module_order(item[0])))


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT: a key matches a module name that ends with it (regex)
        if re.search(rf"(^|\.){key}$", module):
            return value
    return default


def _module_order(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


class BaseWeights:
    """Weights of a base checkpoint, read one tensor at a time from its safetensors files."""

    def __init__(self, name_or_path: str, load_in_4bit: bool = False) -> None:
        from safetensors import safe_open

        folder = Path(name_or_path)
        if not folder.is_dir():
            folder = self.from_hub_cache(name_or_path)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise AnalysisError(f"base {name_or_path}: no .safetensors weights in {folder}")
        self.name, self.load_in_4bit, self.files = name_or_path, load_in_4bit, {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), file))

    @staticmethod
    def from_hub_cache(name: str) -> Path:
        """The local snapshot of hub model ``name`` (fetched when the hub is reachable); else an AnalysisError."""
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as err:
            raise AnalysisError(
                f"base {name}: not a local folder and not available from the hub ({first_line(err)})"
            ) from err

    def weight(self, module: str, shape: tuple[int, int]):
        """``W0`` of ``module`` in float32 (after an NF4 round trip with ``load_in_4bit``)."""
        from safetensors import safe_open

        key = next((k for k in (f"{module}.weight", f"model.{module}.weight") if k in self.files), None)
        if key is None:
            raise AnalysisError(f"base {self.name} has no weight for the adapter's module {module}")
        with safe_open(self.files[key], framework="pt") as handle:
            weight = handle.get_tensor(key)
        if tuple(weight.shape) != shape:
            raise AnalysisError(
                f"base {self.name} does not match the adapter: {module} is {tuple(weight.shape)} there, "
                f"{shape} in the adapter"
            )
        if self.load_in_4bit:
            import bitsandbytes.functional as bnb_functional

            quantized, state = bnb_functional.quantize_4bit(weight.float(), blocksize=64, quant_type="nf4")
            weight = bnb_functional.dequantize_4bit(quantized, state)
        return weight.float()


# ---- the report ---------------------------------------------------------------------------------------------
