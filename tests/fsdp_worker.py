"""FSDP2 on the factor bank: torch's ``fully_shard`` (gloo, CPU) over a tiny PEFT Llama with LoRA-Over installed.

Three AdamW steps on the same batch on every rank, a re-allocation after the first (a module leaves the bank
and a factor's bonds grow: the sharded storage and its sharded Adam moments are permuted), then collapse.
Rank 0 (or the single process, run without torchrun) saves the collapsed LoRA weights and the losses, so the
test can compare a sharded run with a plain one. Launched by tests/test_bank.py.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import load_base, lora_config  # noqa: E402
from peft import get_peft_model  # noqa: E402

from lora_over_trl import LoraOverConfig, apply_lora_over, collapse  # noqa: E402
from lora_over_trl.lora_over.model import banks, over_parameterized_factors, set_layouts  # noqa: E402
from lora_over_trl.sft.run import end_process_group  # noqa: E402


def main(base: str, out: str) -> None:
    sharded = "RANK" in os.environ
    if sharded:
        from torch.distributed.fsdp import fully_shard

        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    model = get_peft_model(load_base(base, "fp32"), lora_config())
    config = LoraOverConfig(capacity=1.0)
    apply_lora_over(model, config, reserve=200_000)  # room for the growth below
    if sharded:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert type(next(iter(banks(model).values())).storage).__name__ == "DTensor"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.arange(3, 43).reshape(2, 20)
    losses = []
    for step in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for bank in banks(model).values():
            bank.seed_fresh_moments(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 0:
            key = "model.layers.0.self_attn.q_proj.lora_A"
            layout = over_parameterized_factors(model)[key].layout
            leaving = {f"model.layers.1.mlp.up_proj.{w}": None for w in ("lora_A", "lora_B")}
            grown = replace(layout, bonds=tuple(b + 3 for b in layout.bonds))
            set_layouts(model, {**leaving, key: grown}, config, optimizer=optimizer)
            optimizer.param_groups[0]["params"] = [p for p in model.parameters() if p.requires_grad]
    errors = collapse(model)
    state = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
        if "lora_" in k
    }
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"state": state, "losses": losses, "max_error": max(errors.values())}, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
    end_process_group()  # before exit: a live gloo group can abort the process at interpreter teardown
