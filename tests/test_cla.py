"""cLA, random cLA, c3LA, random c3LA through a real TRL SFTTrainer on tiny Llamas; collapse; resume mid-chain."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import logged_losses, logits, make_sft_trainer

from lora_over_trl.config import ClaConfig
from lora_over_trl.methods import ClaCallback
from lora_over_trl.methods.cla import ChainedB, WindowSelect, collapse_cla, selector, window_offsets
from lora_over_trl.patch import lora_modules


def make_trainer(tiny_llama_dir, tokenizer, out, config, kind="fp32", **overrides):
    return make_sft_trainer(tiny_llama_dir, tokenizer, out, ClaCallback(config), kind, **overrides)


losses = logged_losses


def delta_weight(layer) -> torch.Tensor:
    """``sum_j B_j A_j`` in float64, from the current window and the frozen ones, each multiplied on its own."""
    select, linear_b = layer.lora_A["default"], layer.lora_B["default"]
    r, n = len(select.current_indices), select.in_features
    total = linear_b.weight.double() @ selector(select.current_indices, n, torch.float64)
    if isinstance(linear_b, ChainedB):
        for j in range(linear_b.frozen.shape[1] // r):
            window = select.frozen_indices[j * r : (j + 1) * r]
            total += linear_b.frozen[:, j * r : (j + 1) * r].double() @ selector(window, n, torch.float64)
    return total.detach()


def test_window_is_a_gather_equal_to_the_dense_selector():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 40, generator=generator)
    for offset in (0, 12, 35):  # 35: the window wraps past the last column
        select = WindowSelect(40, (torch.arange(8) + offset) % 40, dtype=torch.float32, device=torch.device("cpu"))
        expected = x @ select.weight.T
        assert torch.equal(select(x), expected)  # 0/1 weights: the matmul is exact, so equality is bitwise
        assert not select.weight.requires_grad
        assert select.weight.sum() == 8 and (select.weight.sum(dim=0) <= 1).all()


def test_window_orders_are_seeded_and_cover_every_window():
    r, n = 8, 40
    chained = window_offsets(n, r, ClaConfig(method="c3la"), "model.layers.0.self_attn.q_proj")
    assert chained == [0, 8, 16, 24, 32]
    shuffled = window_offsets(n, r, ClaConfig(method="rc3la", seed=3), "model.layers.0.self_attn.q_proj")
    assert sorted(shuffled) == chained and shuffled != chained
    assert shuffled == window_offsets(n, r, ClaConfig(method="rc3la", seed=3), "model.layers.0.self_attn.q_proj")
    offsets = {window_offsets(n, r, ClaConfig(method="rcla"), f"layer{i}")[0] for i in range(20)}
    assert len(offsets) > 5 and all(0 <= o < n for o in offsets)
    # the seed is in the draw: another seed gives other windows and other orders (over 20 modules)
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(20)]
    for method in ("rcla", "rc3la"):
        by_seed = [[window_offsets(n, r, ClaConfig(method=method, seed=seed), m) for m in names] for seed in (3, 4)]
        assert by_seed[0] != by_seed[1], method
        assert sum(a != b for a, b in zip(*by_seed, strict=True)) > 10, method
    assert window_offsets(n, r, ClaConfig(method="cla"), "x") == [0]


@pytest.mark.parametrize("method, kind", [("cla", "fp32"), ("rcla", "nf4"), ("c3la", "fp32"), ("rc3la", "nf4")])
def test_trains_only_b_and_collapses_to_a_standard_adapter(
    tiny_llama_dir, tokenizer, gsm8k_batch, tmp_path, method, kind
):
    config = ClaConfig(method=method, chain_interval=3)
    trainer = make_trainer(tiny_llama_dir, tokenizer, tmp_path / "run", config, kind, max_steps=8, save_strategy="no")
    layers = lora_modules(trainer.model)
    selectors = [layer.lora_A["default"] for layer in layers.values()]
    assert all(isinstance(s, WindowSelect) for s in selectors)
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert trainable == {id(layer.lora_B["default"].weight) for layer in layers.values()}  # A is not trained
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ClaCallback))
    callback.config.collapse_on_train_end = False
    trainer.train()
    chained = method in ("c3la", "rc3la")
    assert callback.position == (2 if chained else 0)  # chain steps after steps 3 and 6 of 8
    trained = logits(trainer.model, *gsm8k_batch)
    expected = {name: delta_weight(layer) for name, layer in layers.items()}  # sum_j B_j A_j from the pieces
    rank = collapse_cla(trainer.model)
    assert rank == (3 if chained else 1) * 8
    for name, layer in layers.items():
        got = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        torch.testing.assert_close(got, expected[name], rtol=1e-12, atol=0)  # concatenation: exact
    # fp32: the same function; 4-bit: TRL trains B in bfloat16, where one matmul over k r columns rounds
    # differently from the chain's k matmuls (~1e-3 in the logits)
    tolerance = 1e-5 if kind == "fp32" else 1e-2
    assert (logits(trainer.model, *gsm8k_batch) - trained).abs().max() <= tolerance
    for layer in layers.values():
        a = layer.lora_A["default"].weight
        assert type(layer.lora_A["default"]) is torch.nn.Linear and a.shape[0] == rank
        assert set(a.unique().tolist()) <= {0.0, 1.0} and (a.sum(dim=1) == 1).all()  # rows select columns
        assert layer.lora_B["default"].weight.abs().max() > 0
    trainer.model.save_pretrained(tmp_path / "adapter")
    config_file = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_file["r"] == rank and config_file["lora_alpha"] / rank == 16 / 8  # the same scaling
    torch.save(gsm8k_batch, tmp_path / "batch.pt")
    torch.save(trained, tmp_path / "trained.pt")
    # stock PEFT, in a process that never imports this package, reproduces the trained function
    script = textwrap.dedent(f"""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        kwargs = {{}}
        if {kind!r} == "nf4":
            kwargs = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                          bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
        base = AutoModelForCausalLM.from_pretrained({tiny_llama_dir!r}, dtype=torch.float32, **kwargs)
        # TRL trained the 4-bit run's B in bfloat16: keep the adapter's dtype (PEFT would upcast it to float32,
        # skipping the bfloat16 rounding of the activations that the trained function has)
        path = {str(tmp_path / "adapter")!r}
        model = PeftModel.from_pretrained(base, path, autocast_adapter_dtype=False).train()
        ids, mask = torch.load({str(tmp_path / "batch.pt")!r})
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits.float()
        assert "lora_over_trl" not in __import__("sys").modules
        print((out - torch.load({str(tmp_path / "trained.pt")!r})).abs().max().item())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= tolerance


def test_resume_in_the_middle_of_a_chain_matches_an_uninterrupted_run(tiny_llama_dir, tokenizer, tmp_path):
    config = ClaConfig(method="rc3la", chain_interval=3, seed=1)
    full = make_trainer(tiny_llama_dir, tokenizer, tmp_path / "full", config)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"  # one chain step (after step 3) behind it
    assert json.loads((checkpoint / "cla_chain.json").read_text())["position"] == 1
    resumed = make_trainer(tiny_llama_dir, tokenizer, tmp_path / "resumed", ClaConfig(**vars(config)))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = losses(full), losses(resumed)
    for step in range(5, 11):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
