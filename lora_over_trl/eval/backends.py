"""The model the eval command scores, as lm-eval sees it and as MT-Bench's answers are generated from it.

- ``hf``: transformers (the base, in 4-bit NF4 with ``--load_in_4bit``, plus the adapter through stock PEFT), handed
  to lm-eval's ``HFLM`` as an instance; MT-Bench answers from ``generate``, one conversation at a time.
- ``vllm``: lm-eval's own ``VLLM`` model (the base plus the adapter as a LoRA request, or a merged folder), and the
  MT-Bench answers from the same engine's ``chat``, every conversation of a turn in one batch, with the same
  per-category sampling. For a 4-bit run, score ``merged/`` (the trained function): vLLM's in-flight 4-bit
  quantization is not the NF4 base the adapter was trained against.
- ``auto`` (the default): ``vllm`` when it is installed and a GPU is present, else ``hf``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_over_trl.eval.mt_bench import Generator, hf_generator, vllm_generator
from lora_over_trl.utils.errors import first_line

__all__ = [
    "BACKENDS",
    "BackendError",
    "Loaded",
    "adapter_rank",
    "choose_backend",
    "load",
    "load_transformers",
    "vllm_lora_rank",
    "vllm_rank_limit",
]

BACKENDS = ("auto", "hf", "vllm")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks (0.32)


@dataclass
class Loaded:
    """The lm-eval model and the MT-Bench generator of one loaded checkpoint."""

    lm: Any
    generator: Generator
    backend: str


def choose_backend(requested: str) -> str:
    """``hf`` or ``vllm`` for ``--backend`` (``auto``: vLLM when it is installed and CUDA is available)."""
    if requested != "auto":
        return requested
    if importlib.util.find_spec("vllm") is None:
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def adapter_rank(adapter: Path) -> int:
    """The largest rank in ``adapter_config.json`` (``r`` and any ``rank_pattern`` entry)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    return max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])


def vllm_rank_limit(ranks: list[int]) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds every rank.

    Raises:
        ValueError: a rank above vLLM's largest limit.
    """
    top = max(ranks)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= top:
            return allowed
    raise ValueError(f"adapter rank {top} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def vllm_lora_rank(adapter: Path) -> int:
    """The ``max_lora_rank`` vLLM needs to serve ``adapter``."""
    return vllm_rank_limit([adapter_rank(adapter)])


def _tokenizer_folder(base: str, adapter: Path | None) -> str:
    """The adapter's folder when the run saved its tokenizer there (its chat template), else the base."""
    return str(adapter) if adapter is not None and (adapter / "tokenizer_config.json").is_file() else base


def load(base: str, adapter: Path | None, args: argparse.Namespace) -> Loaded:
    """Load ``base`` (+ ``adapter``) with the backend ``args.backend`` resolves to."""
    backend = choose_backend(args.backend)
    if backend == "vllm":
        return _load_vllm(base, adapter, args)
    return _load_hf(base, adapter, args)


def load_transformers(
    base: str, adapter: Path | None, *, device: str | None, dtype: str, load_in_4bit: bool
) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the base (in 4-bit NF4 when asked) with the adapter through stock PEFT, in eval mode,
    and the run's tokenizer (the adapter's folder when it holds one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
        )
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if not load_in_4bit:
        model = model.to(device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), AutoTokenizer.from_pretrained(_tokenizer_folder(base, adapter))


def _load_hf(base: str, adapter: Path | None, args: argparse.Namespace) -> Loaded:
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load_transformers(
        base, adapter, device=args.device, dtype=args.dtype, load_in_4bit=args.load_in_4bit
    )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    return Loaded(lm, hf_generator(model, tokenizer, max_new_tokens=args.max_new_tokens), "hf")


class BackendError(ValueError):
    """The requested backend cannot run here (one line for the command)."""


def _load_vllm(base: str, adapter: Path | None, args: argparse.Namespace) -> Loaded:
    try:
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError as err:  # vLLM missing, or lm-eval cannot find it (importlib.metadata names it "vllm")
        raise BackendError(f"--backend vllm: lm-eval's vLLM model does not import ({first_line(err)})") from err

    lora = {"lora_local_path": str(adapter), "max_lora_rank": vllm_lora_rank(adapter)} if adapter else {}
    lm = VLLM(
        pretrained=base,
        tokenizer=_tokenizer_folder(base, adapter),
        dtype=args.dtype,
        batch_size="auto",
        max_model_len=args.max_model_len,
        **lora,
    )
    generator = vllm_generator(lm.model, lm.lora_request, max_new_tokens=args.max_new_tokens)
    return Loaded(lm, generator, "vllm")
