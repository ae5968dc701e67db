"""keep_cpu_4bit_layout: an eval-mode forward on CPU leaves a 4-bit model as it was loaded."""

from __future__ import annotations

import pytest
import torch
from conftest import load_base

from lora_over_trl import keep_cpu_4bit_layout


def _eval_forward_then_save_changes_logits(model, input_ids, tmp_path) -> float:
    """Max abs logit change across an eval-mode forward followed by ``save_pretrained`` (train-mode logits)."""
    model.train()
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)
    model.save_pretrained(tmp_path)
    model.train()
    with torch.no_grad():
        after = model(input_ids=input_ids).logits
    return float((after - before).abs().max())


def test_an_eval_forward_then_a_save_leaves_the_4bit_model_unchanged(tiny_llama_dir, tmp_path):
    from bitsandbytes.nn.modules import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    input_ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(8))
    kept = keep_cpu_4bit_layout(load_base(tiny_llama_dir, "nf4"))
    assert _eval_forward_then_save_changes_logits(kept, input_ids, tmp_path / "kept") == 0.0
    # the failure it prevents, on the same model loaded plainly
    plain = load_base(tiny_llama_dir, "nf4")
    assert _eval_forward_then_save_changes_logits(plain, input_ids, tmp_path / "plain") > 1e-3
