"""Over-parameterized training checkpoints: save, restore onto a fresh PeftModel, keep training identically."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import logits, make_peft
from test_patch import train_steps

from lora_over_trl import LoraOverConfig, apply_lora_over, load_lora_over, save_lora_over
from lora_over_trl.lora_over.checkpoint import LAYOUT_FILE
from lora_over_trl.lora_over.model import over_parameterized_factors, set_layouts


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_checkpoint_restores_exactly_and_training_continues_identically(tiny_llama_dir, gsm8k_batch, tmp_path, kind):
    config = LoraOverConfig(capacity=1.0, rules=[{"target_modules": ["v_proj"], "capacity": 0.0}], seed=5)
    model = make_peft(tiny_llama_dir, kind)
    apply_lora_over(model, config, aux_scale=2.5)  # the auxiliary cores' learning-rate scale is restored too
    for _ in train_steps(model, gsm8k_batch, steps=2):
        pass
    name = "model.layers.1.mlp.up_proj"  # a scheduler may have resized a factor since apply_lora_over
    layout = over_parameterized_factors(model)[f"{name}.lora_B"].layout
    set_layouts(model, {f"{name}.lora_B": replace(layout, bonds=(40,))}, config)
    save_lora_over(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / LAYOUT_FILE).read_text())["factors"][f"{name}.lora_B"]["bonds"] == [40]

    fresh = make_peft(tiny_llama_dir, kind, seed=99)  # other random LoRA weights: everything must come from disk
    assert load_lora_over(fresh, tmp_path / "ckpt") == config
    ours, theirs = over_parameterized_factors(model), over_parameterized_factors(fresh)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].layout == theirs[key].layout and theirs[key].aux_scale == 2.5
        assert all(torch.equal(a, b) for a, b in zip(ours[key].cores, theirs[key].cores, strict=True))
    assert torch.equal(logits(fresh, *gsm8k_batch), logits(model, *gsm8k_batch))
    assert list(train_steps(model, gsm8k_batch, steps=2)) == list(train_steps(fresh, gsm8k_batch, steps=2))


def test_checkpoint_errors(tiny_llama_dir, tmp_path):
    model = make_peft(tiny_llama_dir, "fp32")
    with pytest.raises(ValueError, match="not over-parameterized"):
        save_lora_over(model, tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="not a LoRA-Over checkpoint"):
        load_lora_over(model, tmp_path / "nowhere")
    apply_lora_over(model, LoraOverConfig())
    save_lora_over(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="already over-parameterized"):
        load_lora_over(model, tmp_path / "ckpt")
    other_rank = make_peft(tiny_llama_dir, "fp32", r=4)
    with pytest.raises(
        ValueError,
        match=r"`model\.layers\.\d\.\w+\.\w+\.lora_A` has shape \(4, \d+\) here but "
        r"\(8, \d+\) in the checkpoint: the adapter's rank",
    ):
        load_lora_over(other_rank, tmp_path / "ckpt")
    assert not over_parameterized_factors(other_rank)  # nothing half-installed
    fewer_modules = make_peft(tiny_llama_dir, "fp32", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="has no LoRA layer in this model"):
        load_lora_over(fewer_modules, tmp_path / "ckpt")


FORMAT_1 = Path(__file__).parent / "data" / "format1_checkpoint"


def test_a_format_1_checkpoint_loads_and_refuses_to_resume(tiny_llama_dir):
    """tests/data/format1_checkpoint was written by lora-over-trl 0.1 (a parametrization per factor, cores under
    ``...parametrizations.weight.0.cores.<j>``, aux_scale 2.5) on this tiny Llama, with the logits it gave."""
    from lora_over_trl.lora_over.checkpoint import check_resumable

    fresh = make_peft(tiny_llama_dir, "fp32", seed=99)
    config = load_lora_over(fresh, FORMAT_1)
    assert config.seed == 5 and {f.aux_scale for f in over_parameterized_factors(fresh).values()} == {2.5}
    expected = torch.load(FORMAT_1 / "expected_logits.pt")
    torch.testing.assert_close(logits(fresh, expected["input_ids"]), expected["logits"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"written by lora-over-trl 0\.1 .* cannot resume here\. Start a new run"):
        check_resumable(FORMAT_1)
