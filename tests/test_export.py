"""Merged export: a float32 folder that plain transformers loads and that reproduces the trained function."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, make_peft
from test_patch import train_steps
from transformers import AutoModelForCausalLM

from lora_over_trl import LoraOverConfig, apply_lora_over, collapse, export_merged


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_merged_export_reproduces_the_trained_model(tiny_llama_dir, gsm8k_batch, tokenizer, tmp_path, kind):
    model = make_peft(tiny_llama_dir, kind)
    apply_lora_over(model, LoraOverConfig(capacity=1.0))
    for _ in train_steps(model, gsm8k_batch, steps=3):
        pass
    with pytest.raises(ValueError, match=r"still over-parameterized; call collapse"):
        export_merged(model, tmp_path / "merged")
    collapse(model)
    trained = logits(model, *gsm8k_batch)
    export_merged(model, tmp_path / "merged", tokenizer=tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(
        isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear
        for n, m in merged.named_modules()
        if n.endswith("proj")
    )
    assert (logits(merged, *gsm8k_batch) - trained).abs().max() <= 1e-5
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert (logits(base, *gsm8k_batch) - trained).abs().max() > 1e-3  # the update is really in there
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_merged(model, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging folder left behind
