"""apply_lora_over / collapse on tiny Llama bases (fp32, bf16, 4-bit NF4) with real tokenized GSM8K text."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import (
    BASE_KINDS,
    load_base,
    logits,
    lora_config,
    make_peft,
    raises_exactly,
    reference_contract,
    stock_peft_logits_in_fresh_process,
)
from safetensors.torch import load_file

from lora_over_trl import LoraOverConfig, apply_lora_over, collapse
from lora_over_trl.lora_over import mpo
from lora_over_trl.lora_over.model import banks, over_parameterized_factors, set_layouts
from lora_over_trl.utils.peft_layers import lora_modules


def train_steps(model, batch, steps: int, lr: float = 1e-2, groups=None, eps: float = 1e-8):
    """A few AdamW steps with gradient checkpointing; yields after each backward (gradients present)."""
    input_ids, mask = batch
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(groups or [p for p in model.parameters() if p.requires_grad], lr=lr, eps=eps)
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        yield loss.item()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("kind", BASE_KINDS)
def test_apply_is_exact_and_every_core_trains(tiny_llama_dir, gsm8k_batch, kind):
    model = make_peft(tiny_llama_dir, kind, init_lora_weights=False)  # B != 0: a stronger exactness check
    before = logits(model, *gsm8k_batch)
    report = apply_lora_over(model, LoraOverConfig(capacity=1.0))
    assert torch.equal(logits(model, *gsm8k_batch), before)
    factors = over_parameterized_factors(model)
    assert len(factors) == 2 * 14 and 0 < report.aux_params <= report.lora_params
    assert [p for p in model.parameters() if p.requires_grad] == [b.storage for b in banks(model).values()]
    names = [f"{key}.{j}" for key, f in factors.items() for j in range(f.layout.num_cores)]
    seen = dict.fromkeys(names, False)
    for _ in train_steps(model, gsm8k_batch, steps=3):
        grads = [g for f in factors.values() for g in f.core_grads()]
        for name, grad in zip(names, grads, strict=True):
            seen[name] |= bool(grad.abs().max() > 0)
    assert all(seen.values()), [n for n, s in seen.items() if not s]


def test_standard_lora_init_b_zero_cores_train(tiny_llama_dir, gsm8k_batch):
    model = make_peft(tiny_llama_dir, "fp32")  # PEFT default: B = 0
    apply_lora_over(model, LoraOverConfig(capacity=0.5, num_cores=3))
    factors = over_parameterized_factors(model)
    seen = [False] * sum(f.layout.num_cores for f in factors.values())
    for _ in train_steps(model, gsm8k_batch, steps=3):
        grads = [g for f in factors.values() for g in f.core_grads()]
        seen = [s or bool(g.abs().max() > 0) for s, g in zip(seen, grads, strict=True)]
    assert all(seen)


def test_capacity_rules_choose_modules_and_sizes(tiny_llama_dir):
    model = make_peft(tiny_llama_dir, "fp32")
    config = LoraOverConfig(
        capacity=0.0,
        rules=[
            {"target_modules": ["q_proj", "v_proj"], "capacity": 2.0, "layers": [1, 1]},
            {"target_modules": ["down_proj"], "capacity": 0.5},
        ],
    )
    report = apply_lora_over(model, config)
    expected = {
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    }
    assert set(report.layouts) == expected
    for key, factor in over_parameterized_factors(model).items():
        module = key.rsplit(".", 1)[0]
        assert factor.aux_params <= config.capacity_of(module) * math.prod(factor.layout.shape)


@pytest.mark.parametrize("kind", BASE_KINDS)
def test_collapse_error_and_stock_peft_reload(tiny_llama_dir, gsm8k_batch, tmp_path, kind):
    model = make_peft(tiny_llama_dir, kind)
    apply_lora_over(model, LoraOverConfig(capacity=1.5))
    for _ in train_steps(model, gsm8k_batch, steps=2):
        pass
    factors = over_parameterized_factors(model)
    layers = lora_modules(model)
    expected_ba = {}
    for name in layers:
        a, b = (reference_contract(factors[f"{name}.{w}"].cores) for w in ("lora_A", "lora_B"))
        expected_ba[name] = b @ a
    trained = logits(model, *gsm8k_batch)
    errors = collapse(model)
    assert set(errors) == set(layers) and max(errors.values()) <= 1e-6
    assert not over_parameterized_factors(model)
    for name, layer in layers.items():
        ba = (
            layer.lora_B["default"].weight.double().detach().numpy()
            @ layer.lora_A["default"].weight.double().detach().numpy()
        )
        assert np.linalg.norm(ba - expected_ba[name]) <= 1e-6 * np.linalg.norm(expected_ba[name])
        assert layer.lora_A["default"].weight.requires_grad
    assert (logits(model, *gsm8k_batch) - trained).abs().max() <= 1e-5

    collapsed, vanilla = tmp_path / "collapsed", tmp_path / "vanilla"
    model.save_pretrained(collapsed)
    make_peft(tiny_llama_dir, "fp32").save_pretrained(vanilla)
    ours, theirs = load_file(collapsed / "adapter_model.safetensors"), load_file(vanilla / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    config, vanilla_config = (json.loads((d / "adapter_config.json").read_text()) for d in (collapsed, vanilla))
    assert config == vanilla_config

    stock = stock_peft_logits_in_fresh_process(tiny_llama_dir, collapsed, kind, gsm8k_batch, tmp_path)
    assert (stock - trained).abs().max() <= 1e-5


@pytest.mark.parametrize("scale", [1.0, 0.1], ids=["as-trained", "small"])
def test_the_reported_collapse_error_is_the_measured_one(tiny_llama_dir, gsm8k_batch, scale):
    """Collapsing to bfloat16 rounds B and A (a real error, about 1e-3): what collapse reports per module must be
    ``||B A - B' A'|| / ||B' A'||`` computed densely from the saved weights and a float64 contraction of the cores,
    relative also when ``||B A|| < 1`` (every core scaled by 0.1: ``B A`` by 1e-4)."""
    model = make_peft(tiny_llama_dir, "fp32", init_lora_weights=False)
    apply_lora_over(model, LoraOverConfig(capacity=1.0))
    for _ in train_steps(model, gsm8k_batch, steps=1):
        pass
    with torch.no_grad():
        for bank in banks(model).values():
            bank.storage.mul_(scale)
    factors = over_parameterized_factors(model)
    layers = lora_modules(model)
    expected = {
        name: reference_contract(factors[f"{name}.lora_B"].cores) @ reference_contract(factors[f"{name}.lora_A"].cores)
        for name in layers
    }
    errors = collapse(model, dtype=torch.bfloat16)
    for name, layer in layers.items():
        b, a = (getattr(layer, w)["default"].weight.detach().double().numpy() for w in ("lora_B", "lora_A"))
        measured = np.linalg.norm(b @ a - expected[name]) / np.linalg.norm(expected[name])
        assert 1e-5 < measured < 1e-2 and errors[name] == pytest.approx(measured, rel=1e-6), name
        if scale < 1:
            assert np.linalg.norm(expected[name]) < 1  # the case a clamp of the norm at 1 would get wrong


def test_one_factor_only_and_a_frozen_bank_collapse_as_they_were(tiny_llama_dir, gsm8k_batch):
    """``factors="A"``: B stays the plain weight it was and the error is still reported per module; a frozen bank
    collapses into frozen weights."""
    model = make_peft(tiny_llama_dir, "fp32", init_lora_weights=False)
    apply_lora_over(model, LoraOverConfig(capacity=1.0, factors="A"))
    b_before = {name: layer.lora_B["default"].weight.detach().clone() for name, layer in lora_modules(model).items()}
    trained = logits(model, *gsm8k_batch)
    errors = collapse(model)
    assert set(errors) == set(b_before) and max(errors.values()) <= 1e-6
    for name, layer in lora_modules(model).items():
        assert torch.equal(layer.lora_B["default"].weight, b_before[name])
    assert (logits(model, *gsm8k_batch) - trained).abs().max() <= 1e-6
    frozen = make_peft(tiny_llama_dir, "fp32", init_lora_weights=False)
    apply_lora_over(frozen, LoraOverConfig(capacity=1.0))
    for bank in banks(frozen).values():
        bank.storage.requires_grad_(False)
    collapse(frozen, dtype=torch.float64)
    weights = [
        getattr(layer, w)["default"].weight for layer in lora_modules(frozen).values() for w in ("lora_A", "lora_B")
    ]
    assert all(w.dtype == torch.float64 and not w.requires_grad for w in weights)


def test_resize_grows_exactly_and_truncation_reports_its_error(tiny_llama_dir, gsm8k_batch):
    model = make_peft(tiny_llama_dir, "fp32", init_lora_weights=False)
    config = LoraOverConfig(capacity=1.0)
    apply_lora_over(model, config)
    before = logits(model, *gsm8k_batch)
    layers = lora_modules(model)
    key = "model.layers.0.self_attn.q_proj.lora_A"
    layout = over_parameterized_factors(model)[key].layout
    wider = replace(layout, bonds=tuple(b + 5 for b in layout.bonds))
    assert set_layouts(model, {key: wider}, config) == {key: 0.0}  # the bank grows past its reservation
    assert over_parameterized_factors(model)[key].layout == wider
    assert torch.equal(logits(model, *gsm8k_batch), before)
    weight = layers["model.layers.0.self_attn.q_proj"].lora_A["default"].weight.detach().double().numpy()
    error = set_layouts(model, {key: replace(layout, bonds=(2,))}, config)[key]
    after = reference_contract(over_parameterized_factors(model)[key].effective_cores())
    assert error == pytest.approx(np.linalg.norm(after - weight) / np.linalg.norm(weight), rel=1e-4)
    assert error > 1e-3


def test_bad_input_is_a_clear_error(tiny_llama_dir):
    modules = [f"model.layers.{i}.mlp.{t}" for i in (0,) for t in ("down_proj", "gate_proj", "up_proj")]
    raises_exactly(
        "apply_lora_over: the model has no linear LoRA layers with adapter `default`; "
        "wrap it with peft.get_peft_model(model, LoraConfig(...)) first, or set `adapter_name`",
        apply_lora_over,
        load_base(tiny_llama_dir, "fp32"),
        LoraOverConfig(),
    )
    model = make_peft(tiny_llama_dir, "fp32")
    raises_exactly(
        f"`target_modules` ['qq_proj'] matches none of the LoRA modules, e.g. {modules}",
        apply_lora_over,
        model,
        LoraOverConfig(target_modules=["qq_proj"]),
    )
    raises_exactly(
        f"`rules[0]` (['q_proj'], layers=[5, 9]) matches none of the LoRA modules, e.g. {modules}",
        apply_lora_over,
        model,
        LoraOverConfig(rules=[{"target_modules": ["q_proj"], "capacity": 1, "layers": [5, 9]}]),
    )
    unknown = [f"model.layers.{i}.mlp.up_proj" for i in range(4, 10)]  # six: the message names five
    raises_exactly(
        f"apply_lora_over: `capacities` names modules without LoRA: {unknown[:5]}; LoRA modules are e.g. {modules}",
        apply_lora_over,
        model,
        LoraOverConfig(),
        capacities=dict.fromkeys(unknown, 1.0),
    )
    raises_exactly(
        "apply_lora_over: `aux_scale` must be > 0, got 0.0", apply_lora_over, model, LoraOverConfig(), aux_scale=0.0
    )
    with pytest.raises(ValueError, match="adapter `other`"):
        apply_lora_over(model, LoraOverConfig(adapter_name="other"))
    never = (
        "collapse: the model has no over-parameterized LoRA factors (collapse() already ran, "
        "or apply_lora_over() never did)"
    )
    raises_exactly(never, collapse, model)
    apply_lora_over(model, LoraOverConfig())  # PEFT's init: B = 0, so B A = 0
    raises_exactly(
        "apply_lora_over: the model is already over-parameterized; call collapse() first",
        apply_lora_over,
        model,
        LoraOverConfig(),
    )
    missing = [f"model.layers.{i}.nope.lora_A" for i in range(4)]  # four: the message names three
    raises_exactly(
        f"set_layouts: no LoRA factor named {missing[:3]}; factors are e.g. "
        "['model.layers.0.mlp.down_proj.lora_A', 'model.layers.0.mlp.down_proj.lora_B']",
        set_layouts,
        model,
        dict.fromkeys(missing),
        LoraOverConfig(),
    )
    key = "model.layers.0.mlp.down_proj.lora_A"
    other_shape = mpo.choose_layout(8, 64)
    installed = over_parameterized_factors(model)[key].layout
    raises_exactly(
        f"set_layouts: `{key}` has shape {installed.shape}, the layout (8, 64)",
        set_layouts,
        model,
        {key: other_shape},
        LoraOverConfig(),
    )
    assert set(collapse(model).values()) == {0.0}  # nothing to lose and nothing to divide by: 0, not 0 / 0
    raises_exactly(
        f"set_layouts: `{key}` weight has shape {installed.shape} but the layout needs (8, 64): "
        "the adapter's rank or the base model differ",
        set_layouts,
        model,
        {key: other_shape},
        LoraOverConfig(),
    )
    raises_exactly(never, collapse, model)


def test_a_named_adapter_other_cores_the_seeding_rule_and_cleanup(tiny_llama_dir, gsm8k_batch, caplog):
    """An adapter not named "default" through apply, set_layouts and collapse (which reads the name from the
    model); three-core layouts of a given size; a reservation; the seeding rule of re-decomposed factors; the
    one-line report; nothing left on the model after the collapse."""
    from peft import get_peft_model

    from lora_over_trl.lora_over.model import (
        _HOOK_ATTR,
        BANK_ATTR,
        default_std,
        factor_linears,
        module_generator,
        plan_layout,
    )

    torch.manual_seed(0)
    model = get_peft_model(
        load_base(tiny_llama_dir, "fp32"), lora_config(init_lora_weights=False), adapter_name="other"
    )
    before = logits(model, *gsm8k_batch)
    config = LoraOverConfig(adapter_name="other", capacity=1.0, num_cores=3, aux_core_size=8, seed=5)
    shapes = {key: tuple(linear.weight.shape) for key, linear in factor_linears(model, "other").items()}
    with caplog.at_level("INFO", logger="lora_over_trl.lora_over.model"):
        report = apply_lora_over(model, config, reserve=10**6)
    factors = over_parameterized_factors(model, "other")
    assert set(factors) == set(shapes) and not over_parameterized_factors(model)  # nothing under "default"
    again = "apply_lora_over: the model is already over-parameterized; call collapse() first"
    raises_exactly(again, apply_lora_over, model, config)
    for key, factor in factors.items():
        assert factor.layout == plan_layout(shapes[key], 1.0, num_cores=3, aux_core_size=8)
    assert [bank.storage.numel() for bank in banks(model, "other").values()] == [10**6]
    lora_params = sum(math.prod(shape) for shape in shapes.values())
    aux = sum(f.layout.aux_params() for f in factors.values())
    line = (
        f"LoRA-Over: {len(shapes)} factors over-parameterized in {len(shapes) // 2} modules; "
        f"LoRA params {lora_params:,}, auxiliary params {aux:,} ({aux / lora_params:.2f}x)"
    )
    assert str(report) == line and line in caplog.messages
    assert (logits(model, *gsm8k_batch) - before).abs().max() <= 1e-5

    # The seeding rule of a factor given other cores, more bonds or fewer: the contraction is decomposed, padded
    # or truncated with the generator of (seed + 1, "<module>.<A|B>.<bonds>") and the Kaiming-like std.
    assert default_std(64) == 0.125 and default_std(0) == 1.0
    module = "model.layers.0.self_attn.q_proj"
    keys = {w: f"{module}.lora_{w}" for w in "AB"}
    old = {w: factors[k].layout for w, k in keys.items()}
    effective = {w: [c.detach().clone() for c in factors[k].effective_cores()] for w, k in keys.items()}
    other_cores = plan_layout(shapes[keys["A"]], 1.0, num_cores=2, aux_core_size=4)
    wider = mpo.MpoLayout(old["B"].rows, old["B"].cols, tuple(b + 2 for b in old["B"].bonds), old["B"].central)
    errors = set_layouts(model, {keys["A"]: other_cores, keys["B"]: wider}, config)
    assert errors == {keys["A"]: 0.0, keys["B"]: 0.0}

    def rule(which: str, layout: mpo.MpoLayout) -> torch.Generator:
        return module_generator(6, f"{module}.{which}.{layout.bonds}")

    std = default_std(shapes[keys["A"]][1])
    expected_a = mpo.decompose(mpo.contract(effective["A"]), other_cores, std=std, generator=rule("A", other_cores))
    expected_b = mpo.grow(effective["B"], wider, std=default_std(shapes[keys["B"]][1]), generator=rule("B", wider))
    for key, expected in ((keys["A"], expected_a), (keys["B"], expected_b)):
        got = over_parameterized_factors(model, "other")[key].effective_cores()
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)), key
    narrower = mpo.MpoLayout(
        old["B"].rows, old["B"].cols, tuple(max(b - 1, 1) for b in old["B"].bonds), old["B"].central
    )
    grown_b = [c.detach().clone() for c in over_parameterized_factors(model, "other")[keys["B"]].effective_cores()]
    errors = set_layouts(model, {keys["B"]: narrower}, config)
    expected_b, error = mpo.truncate(
        grown_b, narrower, std=default_std(shapes[keys["B"]][1]), generator=rule("B", narrower)
    )
    assert errors == {keys["B"]: error}
    got = over_parameterized_factors(model, "other")[keys["B"]].effective_cores()
    assert all(torch.equal(g, e) for g, e in zip(got, expected_b, strict=True))

    trained = logits(model, *gsm8k_batch)
    with caplog.at_level("INFO", logger="lora_over_trl.lora_over.model"):
        errors = collapse(model)  # no adapter argument: the model's config names "other"
    assert f"LoRA-Over collapse: {len(shapes) // 2} modules, max relative error of B A {max(errors.values()):.2e}" in (
        caplog.messages
    )
    assert not over_parameterized_factors(model, "other") and not hasattr(model.get_base_model(), BANK_ATTR)
    assert getattr(model.get_base_model(), _HOOK_ATTR) is None and not model.get_base_model()._forward_pre_hooks
    assert (logits(model, *gsm8k_batch) - trained).abs().max() <= 1e-5


def test_one_contraction_per_forward_changes_no_gradient(tiny_llama_dir, gsm8k_batch):
    """The forward pre-hook's one contraction per forward gives the gradients of contracting at the first read
    (no hook), with gradient checkpointing and two accumulated micro-batches; a deep copy works."""
    import copy

    from lora_over_trl.lora_over.model import _HOOK_ATTR

    models = []
    for hooked in (True, False):
        model = make_peft(tiny_llama_dir, "fp32")
        apply_lora_over(model, LoraOverConfig(capacity=1.0, seed=3))
        if not hooked:
            getattr(model.get_base_model(), _HOOK_ATTR).remove()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        input_ids, mask = gsm8k_batch
        for half in (slice(0, 2), slice(2, 4)):
            ids = input_ids[half]
            model(input_ids=ids, attention_mask=mask[half], labels=ids).loss.backward()
        models.append(model)
    hooked, lazy = (next(iter(banks(m).values())).storage.grad for m in models)
    assert hooked.abs().max() > 0 and torch.allclose(hooked, lazy, rtol=1e-5, atol=1e-7)
    clone = copy.deepcopy(models[0])  # e.g. a reference model; the cached slices must not get in the way
    assert torch.equal(logits(clone, *gsm8k_batch), logits(models[0], *gsm8k_batch))


def test_reentrant_checkpointing_gets_the_same_gradients(tiny_llama_dir, gsm8k_batch):
    """Reentrant checkpointing backpropagates once per layer into the shared contraction: a spent contraction
    is re-made, so the gradient equals the one without checkpointing."""
    grads = []
    for kwargs in ({"use_reentrant": True}, None):
        model = make_peft(tiny_llama_dir, "fp32", init_lora_weights=False)
        apply_lora_over(model, LoraOverConfig(capacity=1.0, seed=3))
        if kwargs:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            model.enable_input_require_grads()
        model.train()
        ids, mask = gsm8k_batch
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(next(iter(banks(model).values())).storage.grad)
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_in_place_edits_after_a_cached_forward_reach_collapse_and_forward(tiny_llama_dir, gsm8k_batch):
    """A no-grad forward caches the slices; an in-place edit of the cores must not be served stale."""
    model = make_peft(tiny_llama_dir, "fp32", init_lora_weights=False)
    apply_lora_over(model, LoraOverConfig(capacity=1.0, seed=3), aux_scale=3.0)
    before = logits(model, *gsm8k_batch)  # no grad: the slices are cached until the storage changes
    factors = over_parameterized_factors(model)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for factor in factors.values():
            for core in factor.cores:
                core.add_(torch.randn(core.shape, generator=generator) * 0.05)
    expected = {key: reference_contract(f.effective_cores()) for key, f in factors.items()}
    for key in expected:  # a read outside any forward sees the edit too
        assert np.abs(_weight(model, key) - expected[key]).max() <= 1e-6 * np.abs(expected[key]).max(), key
    edited = logits(model, *gsm8k_batch)
    assert (edited - before).abs().max() > 1e-3
    collapse(model)
    assert torch.equal(logits(model, *gsm8k_batch), edited)
    for key, layer_weight in ((k, _weight(model, k)) for k in expected):
        assert np.abs(layer_weight - expected[key]).max() <= 1e-6 * np.abs(expected[key]).max(), key


def _weight(model, key: str) -> np.ndarray:
    module, attr = key.rsplit(".", 1)
    return getattr(lora_modules(model)[module], attr)["default"].weight.detach().double().numpy()


def test_one_batched_contraction_per_layout_and_step(tiny_llama_dir, gsm8k_batch, monkeypatch):
    from lora_over_trl.lora_over import bank as bank_module

    model = make_peft(tiny_llama_dir, "fp32")
    apply_lora_over(model, LoraOverConfig(capacity=1.0))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = []
    real = bank_module.mpo.contract
    monkeypatch.setattr(bank_module.mpo, "contract", lambda cores: calls.append(1) or real(cores))
    ids, mask = gsm8k_batch
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    layouts = {f.layout for f in over_parameterized_factors(model).values()}
    assert len(calls) == len(layouts) < 28  # not one per factor, and no re-contraction at any read
    calls.clear()
    with torch.no_grad():  # generation: the cores do not change between tokens, so contract once
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
    assert len(calls) == len(layouts)


def _adam_by_hand(model, batch, steps: int, lr: torch.Tensor, eps: float) -> list[float]:
    """Adam (no weight decay) on the bank's storage with a learning rate per element, written out."""
    storage = next(iter(banks(model).values())).storage
    m, v, losses = torch.zeros_like(storage), torch.zeros_like(storage), []
    ids, mask = batch
    model.train()
    for t in range(1, steps + 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            g = storage.grad
            m.mul_(0.9).add_(0.1 * g)
            v.mul_(0.999).add_(0.001 * g * g)
            storage -= lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + eps)
        storage.grad = None
    return losses


def test_aux_scale_gives_adam_the_auxiliary_learning_rate(tiny_llama_dir, gsm8k_batch):
    """Cores stored at 1/s and scaled by s in the contraction train under torch's Adam exactly as unscaled
    cores under a hand-written Adam whose auxiliary elements get s * lr."""
    lr, aux_lr = 2e-3, 1e-2
    reference = make_peft(tiny_llama_dir, "fp32", init_lora_weights=False)
    apply_lora_over(reference, LoraOverConfig(capacity=1.0, seed=3))
    scaled = make_peft(tiny_llama_dir, "fp32", init_lora_weights=False)
    apply_lora_over(scaled, LoraOverConfig(capacity=1.0, seed=3), aux_scale=aux_lr / lr)
    assert (logits(scaled, *gsm8k_batch) - logits(reference, *gsm8k_batch)).abs().max() < 1e-6  # same start
    per_element = torch.full_like(next(iter(banks(reference).values())).storage, lr)
    with torch.no_grad():
        for factor in over_parameterized_factors(reference).values():
            for core in factor.auxiliary_cores():  # a view: mark its elements through the same offsets
                core.fill_(float("nan"))
        storage = next(iter(banks(reference).values())).storage
        aux = storage.isnan()
        saved = {k: [c.clone() for c in f.cores] for k, f in over_parameterized_factors(scaled).items()}
    per_element[aux] = aux_lr
    with torch.no_grad():  # the reference's cores back: the scaled model's, unscaled
        for key, factor in over_parameterized_factors(reference).items():
            for j, core in enumerate(factor.cores):
                core.copy_(saved[key][j] * (1.0 if j == factor.layout.central else aux_lr / lr))
    # Adam's epsilon acts on the stored gradient (s times larger): with the usual 1e-8, coordinates whose
    # gradient is itself ~1e-8 (fresh padding) differ; a negligible epsilon isolates the learning-rate claim.
    expected = _adam_by_hand(reference, gsm8k_batch, 3, per_element, eps=1e-20)
    optimizer = torch.optim.Adam([next(iter(banks(scaled).values())).storage], lr=lr, eps=1e-20)
    got = []
    for _ in range(3):
        ids, mask = gsm8k_batch
        loss = scaled(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        got.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    assert got == pytest.approx(expected, rel=1e-5) and expected[0] != pytest.approx(expected[-1], rel=1e-3)
    ours, theirs = over_parameterized_factors(scaled), over_parameterized_factors(reference)
    for key, factor in ours.items():
        for a, b in zip(factor.effective_cores(), theirs[key].cores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6)
    assert any(not torch.equal(f.cores[0], f.effective_cores()[0]) for f in ours.values())  # the scale is at work


def test_collapse_to_float32_keeps_bfloat16_cores_exact(tiny_llama_dir, gsm8k_batch):
    # TRL trains a 4-bit base's adapter in bfloat16; stored in bfloat16, B A would lose ~1e-3 to rounding
    model = make_peft(tiny_llama_dir, "fp32", init_lora_weights=False)
    for layer in lora_modules(model).values():
        layer.lora_A["default"].to(torch.bfloat16)
        layer.lora_B["default"].to(torch.bfloat16)
    apply_lora_over(model, LoraOverConfig(capacity=1.0))
    factors = over_parameterized_factors(model)
    for factor in factors.values():
        with torch.no_grad():
            for core in factor.cores:
                core.add_(torch.randn_like(core) * 0.05)  # fresh, non-trivial cores
    expected = {}
    for name in lora_modules(model):
        a, b = (reference_contract(factors[f"{name}.{w}"].effective_cores()) for w in ("lora_A", "lora_B"))
        expected[name] = b @ a
    assert {part: bank.storage.dtype for part, bank in banks(model).items()} == {"bfloat16_cpu": torch.bfloat16}
    errors = collapse(model, dtype=torch.float32)
    assert max(errors.values()) <= 1e-6
    for name, layer in lora_modules(model).items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.dtype == b.dtype == torch.float32 and a.requires_grad
        ba = b.double().detach().numpy() @ a.double().detach().numpy()
        assert np.linalg.norm(ba - expected[name]) <= 1e-6 * np.linalg.norm(expected[name])


def test_leaving_by_hand_drops_the_bank_and_its_hook_and_a_part_reserves(tiny_llama_dir, gsm8k_batch):
    """Factors leaving through set_layouts: the bank stays while it holds any, then it and the forward hook go;
    the model computes what it did. A new bank reserves what its part is given."""
    from lora_over_trl.lora_over.model import _HOOK_ATTR, BANK_ATTR

    model = make_peft(tiny_llama_dir, "fp32", init_lora_weights=False)
    root = model.get_base_model()
    config = LoraOverConfig(capacity=1.0)
    before = logits(model, *gsm8k_batch)
    apply_lora_over(model, config)
    layouts = {key: factor.layout for key, factor in over_parameterized_factors(model).items()}
    keys = sorted(layouts)
    set_layouts(model, dict.fromkeys(keys[:2]), config)
    assert hasattr(root, BANK_ATTR) and getattr(root, _HOOK_ATTR) is not None and len(root._forward_pre_hooks) == 1
    set_layouts(model, dict.fromkeys(keys[2:]), config)
    assert not hasattr(root, BANK_ATTR) and getattr(root, _HOOK_ATTR) is None and not root._forward_pre_hooks
    assert (logits(model, *gsm8k_batch) - before).abs().max() <= 1e-5
    set_layouts(model, {keys[0]: layouts[keys[0]]}, config, reserve={"float32_cpu": 12_345, "bfloat16_cpu": 7})
    assert {part: bank.storage.numel() for part, bank in banks(model).items()} == {"float32_cpu": 12_345}
    assert len(root._forward_pre_hooks) == 1


def test_set_layouts_by_hand_and_apply_on_the_inner_model(tiny_llama_dir, gsm8k_batch):
    """The primitives without the callback: set_layouts on a plain PEFT model (a bank of exactly the plan's size,
    no auxiliary scale, seeded so that two models agree bit for bit, collapsed without any config); an unchanged
    factor named before a changed one; one bond of three cores growing; an optimizer's moments following their
    factors; and apply_lora_over on the LoRA model inside the PeftModel, with explicit capacities and factors="A"."""
    from lora_over_trl.lora_over.model import factor_linears, plan_layout

    config = LoraOverConfig(num_cores=3)
    models = [make_peft(tiny_llama_dir, "fp32", init_lora_weights=False) for _ in range(2)]
    keys = sorted(factor_linears(models[0]))[:4]
    plan = {k: plan_layout(tuple(factor_linears(models[0])[k].weight.shape), 1.0, num_cores=3) for k in keys}
    for model in models:
        set_layouts(model, plan, config)
    (bank,) = banks(models[0]).values()
    assert bank.aux_scale == 1.0 and bank.storage.numel() == sum(layout.num_params() for layout in plan.values())
    assert torch.equal(bank.storage, next(iter(banks(models[1]).values())).storage)  # seeded by name: reproducible

    model = models[0]
    optimizer = torch.optim.AdamW([bank.storage], lr=1e-3)
    sum((w.weight**2).sum() for w in factor_linears(model).values()).backward()
    optimizer.step()
    moments = {k: [c.clone() for c in bank.stored_cores(k)] for k in keys}
    state = optimizer.state[bank.storage]
    exp_avg = {k: [state["exp_avg"][o : o + math.prod(s)].clone() for o, s in bank.chunks[k]] for k in keys}
    first, last = keys[0], keys[1]  # growing the second shifts the factors stored after it
    old = plan[last]
    one_bond = mpo.MpoLayout(old.rows, old.cols, (old.bonds[0] + 2, old.bonds[1]), old.central)
    before = [c.detach().clone() for c in over_parameterized_factors(model)[last].effective_cores()]
    before_logits = logits(model, *gsm8k_batch)
    assert set_layouts(model, {first: plan[first], last: one_bond}, config, optimizer=optimizer) == {last: 0.0}
    assert over_parameterized_factors(model)[last].layout == one_bond  # the unchanged one first did not stop it
    got, kept = over_parameterized_factors(model)[last].effective_cores(), old.bonds[0]
    # padded, not re-decomposed: the old slots keep their values, the outer core's new slots are zero
    assert torch.equal(got[0][..., :kept], before[0]) and got[0][..., kept:].abs().max() == 0
    assert torch.equal(got[1][:kept], before[1]) and torch.equal(got[2], before[2])
    for key in (k for k in keys if k != last):  # kept factors kept their values and their Adam moments
        assert all(torch.equal(a, b) for a, b in zip(bank.stored_cores(key), moments[key], strict=True))
        now = [state["exp_avg"][o : o + math.prod(s)] for o, s in bank.chunks[key]]
        assert all(torch.equal(a, b) for a, b in zip(now, exp_avg[key], strict=True))
    assert (logits(model, *gsm8k_batch) - before_logits).abs().max() <= 1e-5
    assert max(collapse(model).values()) <= 1e-6  # no lora_over_config on the model: the default adapter

    peft_model = make_peft(tiny_llama_dir, "fp32", init_lora_weights=False)
    inner = peft_model.get_base_model()  # the LoRA model itself: no get_base_model, no "base_model.model." prefix
    module = "model.layers.1.mlp.up_proj"
    apply_lora_over(inner, LoraOverConfig(factors="A"), capacities={module: 1.0})
    assert set(over_parameterized_factors(inner)) == {f"{module}.lora_A"}
    targeted = make_peft(tiny_llama_dir, "fp32")
    apply_lora_over(targeted, LoraOverConfig(target_modules=["q_proj"]))
    assert {k.rsplit(".", 1)[0] for k in over_parameterized_factors(targeted)} == {
        f"model.layers.{i}.self_attn.q_proj" for i in range(2)
    }
