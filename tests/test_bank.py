"""The factor bank on plain linears: repacking moves values and optimizer moments with their factors, new
factors' first Adam step is a fresh Adam's, and the slices are the cores' contraction."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import free_port, raises_exactly, reference_contract
from torch import nn

from lora_over_trl.lora_over import mpo
from lora_over_trl.lora_over.bank import BankedLinear, FactorBank, FactorHandle
from lora_over_trl.lora_over.model import plan_layout

SHAPES = {"a": (8, 48), "b": (48, 8), "c": (8, 48), "d": (8, 96)}


def linears(seed: int = 0) -> dict[str, nn.Linear]:
    torch.manual_seed(seed)
    return {key: nn.Linear(q, p, bias=False) for key, (p, q) in SHAPES.items()}


def cores_of(linear: nn.Linear, layout: mpo.MpoLayout, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return mpo.decompose(linear.weight.detach(), layout, std=0.1, generator=generator)


def train(bank: FactorBank, optimizer, targets: dict[str, torch.Tensor], steps: int) -> None:
    for _ in range(steps):
        bank.refresh()
        loss = sum((bank.weight_of(k) * t).sum() for k, t in targets.items() if k in bank.layouts)
        loss.backward()
        bank.seed_fresh_moments(optimizer)
        optimizer.step()
        optimizer.zero_grad()


def test_repack_moves_values_and_moments_with_their_factors():
    lins = linears()
    layouts = {k: plan_layout(SHAPES[k], 1.0) for k in SHAPES}
    bank = FactorBank(10_000, dtype=torch.float32, device="cpu", aux_scale=2.0)
    first = {k: layouts[k] for k in ("a", "b", "c")}
    bank.repack(first, {k: cores_of(lins[k], layouts[k], i) for i, k in enumerate(first)})
    for key in first:
        expected = lins[key].weight.detach().clone()
        bank.attach(key, lins[key])
        assert isinstance(lins[key], BankedLinear) and "weight" not in lins[key]._parameters
        torch.testing.assert_close(lins[key].weight, expected, rtol=0, atol=1e-6)  # exact start, aux_scale too
    optimizer = torch.optim.AdamW([bank.storage], lr=1e-2, weight_decay=0.0)
    targets = {k: torch.randn(SHAPES[k]) for k in SHAPES}
    train(bank, optimizer, targets, steps=3)
    state = optimizer.state[bank.storage]
    before = {k: [c.clone() for c in bank.stored_cores(k)] for k in ("b", "c")}
    moments = {k: [state["exp_avg_sq"][o : o + math.prod(s)].clone() for o, s in bank.chunks[k]] for k in ("b", "c")}
    storage, size = bank.storage, bank.storage.numel()

    # "a" leaves, "d" enters (another layout, so groups and offsets change), "b" and "c" stay
    second = {k: layouts[k] for k in ("b", "c", "d")}
    bank.repack(second, {"d": cores_of(lins["d"], layouts["d"], 9)}, optimizer)
    assert bank.storage is storage and bank.storage.numel() == size  # the same parameter, nothing re-allocated
    assert optimizer.state[bank.storage] is state
    for key in ("b", "c"):
        assert all(torch.equal(x, y) for x, y in zip(bank.stored_cores(key), before[key], strict=True))
        got = [state["exp_avg_sq"][o : o + math.prod(s)] for o, s in bank.chunks[key]]
        assert all(torch.equal(x, y) for x, y in zip(got, moments[key], strict=True)) and moments[key][0].sum() > 0
    assert all(state[m][o : o + math.prod(s)].abs().max() == 0 for m in ("exp_avg", "exp_avg_sq") for o, s in
               bank.chunks["d"])  # fmt: skip
    for key in second:  # the slices are the contraction of the cores, checked independently
        bank.refresh()
        expected = reference_contract(bank.effective_cores(key))
        assert abs(bank.weight_of(key).detach().double().numpy() - expected).max() <= 1e-6

    # the sensitivity statistic's contraction of a whole group, and of keys from several groups, is each factor's
    shared = FactorBank(0, dtype=torch.float32, device="cpu", aux_scale=2.0)
    plan = {k: layouts[k] for k in ("a", "b", "c")}
    fresh = linears(seed=1)
    shared.repack(plan, {k: cores_of(fresh[k], layouts[k], i) for i, k in enumerate(plan)})
    assert sorted(tuple(keys) for _, keys in shared.groups) == [("a", "c"), ("b",)]
    for keys in [("a", "c"), ("b",), ("c", "a")]:  # the last is no group (order): contracted one by one
        together = shared.contract_group(keys)
        assert together.shape[0] == len(keys) and not together.requires_grad
        for key, weight in zip(keys, together, strict=True):
            assert abs(weight.double().numpy() - reference_contract(shared.effective_cores(key))).max() <= 1e-6

    # a plan larger than the reservation keeps the parameter object too (its data grows)
    big = FactorBank(1, dtype=torch.float32, device="cpu")
    param = big.storage
    big.repack(second, {k: cores_of(lins[k], layouts[k], 1) for k in second})
    assert big.storage is param and big.storage.numel() == FactorBank.numel(second.values())


@pytest.mark.parametrize("wrapped", [False, True], ids=["torch", "accelerate"])
def test_a_new_factor_takes_a_fresh_adams_first_step(wrapped, request):
    lins = linears(1)
    layouts = {k: plan_layout(SHAPES[k], 1.0) for k in SHAPES}
    bank = FactorBank(0, dtype=torch.float32, device="cpu")
    bank.repack({"a": layouts["a"]}, {"a": cores_of(lins["a"], layouts["a"], 0)})
    lr, eps = 1e-2, 1e-8
    optimizer = torch.optim.AdamW([bank.storage], lr=lr, eps=eps, weight_decay=0.0)
    if wrapped:  # what the Trainer hands the callback: accelerate's wrapper, the torch optimizer inside
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        optimizer = Accelerator(cpu=True).prepare_optimizer(optimizer)
        request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))  # none left behind
    targets = {k: torch.randn(SHAPES[k]) for k in SHAPES}
    train(bank, optimizer, targets, steps=40)  # the storage's step count is 40 when "d" enters
    bank.repack({"a": layouts["a"], "d": layouts["d"]}, {"d": cores_of(lins["d"], layouts["d"], 2)}, optimizer)
    before = [c.clone() for c in bank.stored_cores("d")]
    bank.refresh()
    sum((bank.weight_of(k) * targets[k]).sum() for k in ("a", "d")).backward()
    grads = [g.clone() for g in bank.stored_cores("d", grad=True)]
    bank.seed_fresh_moments(optimizer)
    optimizer.step()
    for old, new, g in zip(before, bank.stored_cores("d"), grads, strict=True):
        # a fresh Adam's first step: lr * g / (|g| + eps) (bias corrections cancel the first moments exactly)
        expected = old - lr * g / (g.abs() + eps)
        torch.testing.assert_close(new, expected, rtol=1e-4, atol=1e-7)
        assert (new - old).abs().max() <= lr * 1.0001  # zero moments at step 41 would move up to 3.2 * lr


@pytest.mark.slow
def test_fsdp2_shards_the_bank_and_matches_one_process(tiny_llama_dir, tmp_path):
    """Two processes under torch's FSDP2 (gloo), the bank's storage sharded as a DTensor, a re-allocation with
    the optimizer's sharded moments in the middle: the collapsed adapter is the single process's, bit for bit
    (every rank sees the same batch, so the averaged gradient is the single process's)."""
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "fsdp_worker.py"
    torchrun = Path(sys.executable).parent / "torchrun"
    runs = {
        "sharded": [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(worker)]
        + [tiny_llama_dir, str(tmp_path / "sharded.pt")],
        "plain": [sys.executable, str(worker), tiny_llama_dir, str(tmp_path / "plain.pt")],
    }
    for name, cmd in runs.items():
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (name, done.stderr[-3000:])
    sharded, plain = (torch.load(tmp_path / f"{name}.pt") for name in ("sharded", "plain"))
    assert sharded["losses"] == plain["losses"] and plain["losses"][-1] < plain["losses"][0]
    assert sharded["state"].keys() == plain["state"].keys() and len(plain["state"]) == 28
    assert max(float(v.abs().max()) for k, v in plain["state"].items() if "lora_B" in k) > 1e-3  # B trained
    for key, value in plain["state"].items():
        assert torch.equal(sharded["state"][key], value), key
    assert plain["max_error"] <= 1e-6


def test_gradients_observer_usage_and_copies():
    """What the callback and users read from a bank: each core's gradient (against autograd on the contraction
    written out independently), the group gradients the sensitivity statistic observes, the space in use, the
    repr, and a deep copy (the cached contraction and the observer stay behind)."""
    lins = linears(2)
    layouts = {k: plan_layout(SHAPES[k], 1.0) for k in ("a", "c", "d")}
    bank = FactorBank(0, dtype=torch.float64, device="cpu", aux_scale=3.0)
    bank.repack(layouts, {k: [c.double() for c in cores_of(lins[k], layouts[k], i)] for i, k in enumerate(layouts)})
    handle = FactorHandle(bank, "d")
    assert handle.core_grads() == [None] * layouts["d"].num_cores  # before any backward
    assert bank.used() == sum(layout.num_params() for layout in layouts.values()) <= bank.storage.numel()
    used, size = bank.used(), bank.storage.numel()
    assert repr(bank) == f"FactorBank(factors=3, groups=2, used={used:,}/{size:,}, aux_scale=3)"
    assert repr(FactorBank(0, dtype=torch.float32, device="cpu")) == "FactorBank(factors=0, groups=0, used=0/0)"

    seen = []
    bank.grad_observer = lambda keys, grad: seen.append((tuple(keys), grad.clone()))
    targets = {k: torch.randn(SHAPES[k], dtype=torch.float64) for k in layouts}
    bank.refresh()
    sum((bank.weight_of(k) * t).sum() for k, t in targets.items()).backward()
    # the loss is linear in each weight: the gradient of a group's contraction is its targets, stacked
    assert sorted(keys for keys, _ in seen) == sorted(tuple(keys) for _, keys in bank.groups)
    for keys, grad in seen:
        assert torch.equal(grad, torch.stack([targets[k] for k in keys]))
    # each core's gradient, against autograd through mpo.contract on leaf copies with aux_scale written out
    leaves = [c.detach().clone().requires_grad_() for c in handle.cores]
    central = layouts["d"].central
    weight = mpo.contract([c if j == central else 3.0 * c for j, c in enumerate(leaves)])
    expected = torch.autograd.grad((weight * targets["d"]).sum(), leaves)
    for got, want, core in zip(handle.core_grads(), expected, handle.cores, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert not torch.equal(got, core)

    twin = copy.deepcopy(bank)
    assert twin.grad_observer is None and twin.storage is not bank.storage
    twin.refresh()
    for key in layouts:
        torch.testing.assert_close(twin.weight_of(key), bank.weight_of(key).detach(), rtol=0, atol=0)


def test_repeated_repacks_keep_every_factors_values_and_moments():
    """Factors leave and enter in random order (so kept factors move in several separate runs), in a bank whose
    plan sometimes outgrows its reservation, with an optimizer that has or has not stepped yet: every kept
    factor keeps its stored cores and both Adam moments bit for bit, new ones hold their values and zero
    moments, and a fresh bank is empty."""
    empty = FactorBank(0, dtype=torch.bfloat16, device="cpu")
    assert (empty.storage.numel(), empty.storage.dtype, empty.used(), empty.layouts, empty.groups) == (
        0,
        torch.bfloat16,
        0,
        {},
        [],
    )
    raises_exactly(
        "FactorBank: `aux_scale` must be > 0, got 0.0", FactorBank, 0, dtype=torch.float32, device="cpu", aux_scale=0.0
    )

    shapes = {f"k{i}": (8, 48) if i % 3 else (48, 8) for i in range(9)}
    layouts = {k: plan_layout(s, 1.0) for k, s in shapes.items()}
    generator = torch.Generator().manual_seed(23)
    bank = FactorBank(3_000, dtype=torch.float32, device="cpu", aux_scale=2.0)
    optimizer = torch.optim.AdamW([bank.storage], lr=1e-2)
    raises_exactly(  # four: the message names three
        "FactorBank.repack: no values for new or changed factors ['k0', 'k1', 'k2']",
        bank.repack,
        {k: layouts[k] for k in ("k0", "k1", "k2", "k3")},
        {},
    )
    held: set[str] = set()
    for round_ in range(8):
        kept = {k for k in held if torch.rand(1, generator=generator) < 0.6}
        entering = {k for k in layouts if k not in held and torch.rand(1, generator=generator) < 0.5}
        plan = {k: layouts[k] for k in sorted(kept | entering, key=lambda _: torch.rand(1, generator=generator))}
        before = {k: [c.clone() for c in bank.stored_cores(k)] for k in kept}
        state = optimizer.state.get(bank.storage, {})
        moments = {
            k: {m: [state[m][o : o + math.prod(s)].clone() for o, s in bank.chunks[k]] for m in state if m != "step"}
            for k in kept
        }
        values = {k: [torch.randn(s, generator=generator) for s in layouts[k].core_shapes()] for k in entering}
        bank.repack(plan, values, optimizer)
        state = optimizer.state.get(bank.storage, {})
        for key in kept:
            assert all(torch.equal(x, y) for x, y in zip(bank.stored_cores(key), before[key], strict=True)), round_
            for name, chunks in moments[key].items():
                now = [state[name][o : o + math.prod(s)] for o, s in bank.chunks[key]]
                assert all(torch.equal(x, y) for x, y in zip(now, chunks, strict=True)), (round_, name)
        for key in entering:
            torch.testing.assert_close(bank.effective_cores(key), values[key], rtol=0, atol=0)
            for name in (m for m in state if m != "step"):
                assert all(state[name][o : o + math.prod(s)].abs().max() == 0 for o, s in bank.chunks[key])
        assert bank.used() == FactorBank.numel(plan.values()) <= bank.storage.numel()
        held = set(plan)
        if held:  # a step, so that the next round has moments to move
            bank.refresh()
            sum((bank.weight_of(k) ** 2).sum() for k in held).backward()
            optimizer.step()
            optimizer.zero_grad()


def test_a_factor_leaving_the_middle_of_its_group_moves_the_next_one_down():
    """Three factors of one layout; the middle one leaves: the last one's cores move from slot 2 to slot 1, a copy
    separate from the first one's (which stays), so it keeps its own values and not the leaving one's."""
    layout = plan_layout((8, 48), 1.0)
    generator = torch.Generator().manual_seed(29)
    values = {k: [torch.randn(s, generator=generator) for s in layout.core_shapes()] for k in "abc"}
    bank = FactorBank(0, dtype=torch.float32, device="cpu")
    bank.repack(dict.fromkeys("abc", layout), values)
    bank.repack(dict.fromkeys("ac", layout), {})
    for key in "ac":
        assert all(torch.equal(x, y) for x, y in zip(bank.stored_cores(key), values[key], strict=True)), key
