"""A bitsandbytes 4-bit model on CPU that stays the model it was loaded as."""

from __future__ import annotations

from torch import nn

__all__ = ["keep_cpu_4bit_layout"]


def keep_cpu_4bit_layout(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking ``model``'s 4-bit weights for CPU inference; returns ``model``.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight into a CPU layout at its first
    eval-mode, no-grad forward, and converts it back inexactly at the next ``state_dict()`` (every checkpoint and
    ``save_pretrained``): the model would change mid-run (0.27 max abs logit difference measured on a tiny Llama).
    Call this after loading a 4-bit model on CPU in any script that evaluates and then saves or trains on.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model
