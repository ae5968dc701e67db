"""The factor bank on plain linears: repacking moves values and optimizer moments with their factors, new
factors' first Adam step is a fresh Adam's, and the slices are the cores' contraction."""

from __future__ import annotations

import math

import torch
from conftest import reference_contract
from torch import nn

from lora_over_trl import mpo
from lora_over_trl.bank import BankedLinear, FactorBank
from lora_over_trl.patch import plan_layout

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


def test_a_new_factor_takes_a_fresh_adams_first_step():
    lins = linears(1)
    layouts = {k: plan_layout(SHAPES[k], 1.0) for k in SHAPES}
    bank = FactorBank(0, dtype=torch.float32, device="cpu")
    bank.repack({"a": layouts["a"]}, {"a": cores_of(lins["a"], layouts["a"], 0)})
    lr, eps = 1e-2, 1e-8
    optimizer = torch.optim.AdamW([bank.storage], lr=lr, eps=eps, weight_decay=0.0)
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
        "sharded": [str(torchrun), "--nproc_per_node", "2", str(worker), tiny_llama_dir, str(tmp_path / "sharded.pt")],
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
