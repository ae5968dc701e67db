"""Peak memory of one re-allocation of the factor bank (what the dynamic schedule does every `interval` steps).

    OMP_NUM_THREADS=1 python benches/cost/probe_move_memory.py

SmolLM2-135M-Instruct in bfloat16 (PEFT keeps the LoRA weights, hence the bank, in float32), LoRA r=16 on
every linear layer; every second module over-parameterized at capacity 1, one AdamW step (so the storage has moments);
then one `set_layouts` call moves 60 modules out and 60 others in, with the optimizer. Printed: the bank's
size, the move's time and the resident set's peak during the move above the resident set before it (CPU:
`VmHWM` after resetting it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lora_over_trl import LoraOverConfig
from lora_over_trl.lora_over.model import banks, module_layouts, set_layouts
from lora_over_trl.utils.peft_layers import lora_modules
from lora_over_trl.utils.smollm2 import smollm2_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/, where benchlib lives
from benchlib.cost import peak_rss_reset, status_kb  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"))
    config = LoraOverConfig(capacity=1.0)
    layers = lora_modules(model)
    names = sorted(layers)

    def targets(chosen: list[str]) -> dict:
        found = {}
        for name in names:
            a, b = layers[name].lora_A["default"], layers[name].lora_B["default"]
            shapes = {"A": (a.out_features, a.in_features), "B": (b.out_features, b.in_features)}
            chosen_layouts = module_layouts(shapes, 1.0 if name in chosen else 0.0, config)
            found[f"{name}.lora_A"], found[f"{name}.lora_B"] = chosen_layouts["A"], chosen_layouts["B"]
        return found

    first = names[::2]
    set_layouts(model, targets(first), config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    storage = next(iter(banks(model).values())).storage
    move = targets(names[1::2][:60] + first[:60])
    before = status_kb("VmRSS")
    peak_rss_reset()
    began = time.perf_counter()
    set_layouts(model, move, config, optimizer=optimizer)
    seconds = time.perf_counter() - began
    peak = (status_kb("VmHWM") - before) / 1024
    megabytes = storage.numel() * storage.element_size() / 2**20
    print(f"bank {storage.numel():,} elements ({megabytes:.1f} MiB, {storage.dtype}); 60 modules out, 60 in")
    print(f"move {seconds:.3f} s; peak resident set during the move, above before it: {peak:.1f} MiB")


if __name__ == "__main__":
    main()
