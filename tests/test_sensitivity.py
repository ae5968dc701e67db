"""What the schedules measure: the pre-pass's Fisher information, with every factor in the bank (plain ones as one
core, one module over-parameterized), against the squared gradients of a plain PEFT twin computed by hand."""

from __future__ import annotations

import copy

import torch
from conftest import make_peft

from lora_over_trl import LoraOverConfig
from lora_over_trl.lora_over.model import factor_linears, plain_layout, plan_layout, set_layouts
from lora_over_trl.lora_over.sensitivity import fisher_scores
from lora_over_trl.utils.peft_layers import lora_modules


def batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random token batches whose labels mask a random prefix (-100), as a completion-only collator does."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, 250, (2, 12), generator=generator)
        labels = ids.clone()
        labels[0, : int(torch.randint(1, 6, (1,), generator=generator))] = -100
        labels[1, : int(torch.randint(1, 6, (1,), generator=generator))] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def test_fisher_scores_are_the_mean_squared_lora_gradients(tiny_llama_dir):
    model = make_peft(tiny_llama_dir, seed=3)
    with torch.no_grad():  # B starts at zero in PEFT (then dL/dA = 0): fresh values on every factor
        generator = torch.Generator().manual_seed(4)
        for linear in factor_linears(model).values():
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.05)
    twin = copy.deepcopy(model)
    config = LoraOverConfig(capacity=1.0)
    over = "model.layers.0.self_attn.q_proj"
    targets = {key: plain_layout(tuple(linear.weight.shape)) for key, linear in factor_linears(model).items()}
    for attr in ("lora_A", "lora_B"):
        targets[f"{over}.{attr}"] = plan_layout(tuple(factor_linears(model)[f"{over}.{attr}"].weight.shape), 1.0)
    set_layouts(model, targets, config)
    data = batches(3, seed=5)

    scores = fisher_scores(model, lora_modules(model), "default", data, batches=2)

    expected = dict.fromkeys(lora_modules(twin), 0.0)
    for batch in data[:2]:
        twin.zero_grad()
        twin(**batch).loss.backward()  # the mean over the batch's target tokens
        for name, layer in lora_modules(twin).items():
            for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                expected[name] += float((weight.grad.double() ** 2).sum()) / 2
    assert scores.keys() == expected.keys()
    for name, value in expected.items():
        assert value > 0 and abs(scores[name] - value) <= 1e-4 * value, (name, scores[name], value)
