"""GPU cost of every method against LoRA: a Llama-3.1-8B-shaped model in 4-bit NF4, as users train it.

    python benches/cost/bench_gpu.py --out runs/gpu      # on a CUDA device (`make gpu-check` runs it there)
    python benches/cost/bench_gpu.py --quick             # a tiny Llama on CPU: keeps this script alive in the suite

The model has Llama-3.1-8B's shapes (32 layers, hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128,256)
and random weights: cost does not depend on their values. It is built on the GPU in bfloat16 and its linear
layers quantized there to bitsandbytes NF4 one by one (no 16 GB checkpoint on disk); each arm trains a deep copy
of that base. LoRA r=16 (alpha 32) on every linear layer, bf16 autocast, activation checkpointing, batch 4 x 1024
random tokens, fused AdamW, transformers' ``Trainer`` with each method's callback (TRL is not on the device: see
scripts/gpu_wheels.py; ``SFTTrainer`` adds data preparation only). Arms: LoRA, LoRA-Over static at capacity 1 and
0.25, LoRA-Over dynamic (re-allocations inside the timed steps), cLA, c3LA (a chain step inside them), GLoRA.

Per arm: the median step time over the timed steps (after warm-up steps, CUDA synchronized), the peak
``torch.cuda.max_memory_allocated`` during training, their ratios to LoRA's, and the CUDA kernels of one profiled
step (``torch.profiler``) beside LoRA's. Then the collapse time of the whole 8B-shaped LoRA-Over set (224 modules
at capacity 1) on the GPU, with its largest relative error. Writes ``bench_gpu.json`` and ``bench_gpu.md`` under
``--out``. ``--quick`` times CPU aten ops instead of kernels and RSS-free: it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/, where benchlib lives
from benchlib.methods import method_callback  # noqa: E402

ARMS = ["lora", "lora-over-1", "lora-over-0.25", "lora-over-dynamic", "cla", "c3la", "glora"]
LLAMA31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
)  # fmt: skip
TINY = dict(
    vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip


# Each arm's settings on top of what its label stands for (benchlib.methods.LABELS): re-allocations at steps
# 2, 4, ... and a chain step at step 3, inside the timed steps; GLoRA's ranks 8 and 16.
SETTINGS: dict[str, dict] = {
    "lora-over-dynamic": {"budget_ratio": 0.5, "interval": 2, "warmup_steps": 2, "final_steps": 0},
    "cla": {"chain_interval": 3},
    "c3la": {"chain_interval": 3},
    "glora": {"ranks": [8, 16]},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_base(shape: dict, device: str, compute):
    """A Llama of ``shape`` with random weights, built on ``device``, every decoder linear layer in NF4."""
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(compute)  # built in bf16 directly: 16 GB at 8B, not 32 GB of float32 first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape, dtype=compute))
    finally:
        torch.set_default_dtype(default)
    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                quantized = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False, compute_dtype=compute, quant_type="nf4",
                    device="meta",
                )  # fmt: skip
                quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                setattr(parent, name, quantized.to(device))  # Params4bit quantizes as it moves
    model.is_loaded_in_4bit = True  # what transformers sets for a 4-bit load; PEFT's k-bit preparation reads it
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def count_ops(profile, cuda: bool) -> int:
    """Kernels (CUDA) or aten ops (CPU) in a profiled step."""
    from torch.autograd import DeviceType

    if cuda:
        return sum(1 for e in profile.events() if e.device_type == DeviceType.CUDA)
    return sum(1 for e in profile.events() if e.name.startswith("aten::"))


def run_arm(arm: str, base, args, cuda: bool) -> dict:
    """Train one arm on a copy of ``base``: step times, peak memory, one profiled step."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainerCallback, TrainingArguments

    total = args.warmup + args.steps + 1
    tokens = torch.randint(0, base.config.vocab_size, (total * args.batch, args.length), generator=torch.Generator())
    rows = [{"input_ids": t, "labels": t} for t in tokens]

    class Meter(TrainerCallback):
        def __init__(self):
            self.times, self.ops, self.profile, self.began = [], None, None, 0.0

        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step == total - 1:  # the last step is profiled, not timed
                activities = [torch.profiler.ProfilerActivity.CPU]
                activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
                try:
                    self.profile = torch.profiler.profile(activities=activities)
                    self.profile.__enter__()
                except Exception as err:  # noqa: BLE001
                    log(f"profiler failed to start: {type(err).__name__}: {err}")
                    self.profile = None
            if cuda:
                torch.cuda.synchronize()
            self.began = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            if self.profile is not None:
                try:  # a profiler that cannot start on this machine costs one column, not the run
                    self.profile.__exit__(None, None, None)
                    self.ops = count_ops(self.profile, cuda)
                except Exception as err:  # noqa: BLE001
                    log(f"profiler failed: {type(err).__name__}: {err}")
                self.profile = None
            else:
                self.times.append(time.perf_counter() - self.began)

    model = prepare_model_for_kbit_training(copy.deepcopy(base), use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    callback, meter = method_callback(arm, SETTINGS.get(arm)), Meter()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=out,
                use_cpu=not cuda,
                bf16=cuda,
                max_steps=total,
                per_device_train_batch_size=args.batch,
                learning_rate=1e-4,
                optim="adamw_torch_fused" if cuda else "adamw_torch",
                activation_checkpointing=True,
                logging_steps=1000,
                save_strategy="no",
                report_to=[],
                disable_tqdm=True,
                dataloader_num_workers=0,
            ),  # fmt: skip
            train_dataset=rows,
            callbacks=[c for c in (callback, meter) if c is not None],
        )
        began = time.time()
        trainer.train()
        wall = time.time() - began
    timed = meter.times[args.warmup :]
    result = {
        "arm": arm,
        "step_s": statistics.median(timed),
        "steps_timed": len(timed),
        "ops": meter.ops,
        "wall_s": round(wall, 1),
        "trainable_last": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["train_gib"] = (torch.cuda.max_memory_allocated() - loaded) / 2**30
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def time_collapse(base, cuda: bool) -> dict:
    """Collapse of LoRA-Over at capacity 1 on every linear layer of a copy of ``base`` (random cores)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_over_trl import LoraOverConfig, apply_lora_over, collapse, over_parameterized_factors

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    apply_lora_over(model, LoraOverConfig(capacity=1.0))
    factors = over_parameterized_factors(model)
    with torch.no_grad():
        for factor in factors.values():
            for core in factor.cores:
                core.normal_(0.0, 0.5)
    if cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    errors = collapse(model)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    result = {"modules": len(errors), "factors": len(factors), "seconds": seconds, "max_error": max(errors.values())}
    del model
    return result


def table(results: list[dict], cuda: bool) -> str:
    """Markdown: each arm against LoRA."""
    lora = results[0]
    unit = "kernels" if cuda else "aten ops"
    header = ["method", "step s", "x LoRA", f"{unit}/step", f"extra {unit}"]
    header += ["peak GiB", "x LoRA", "train GiB", "x LoRA"] if cuda else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["arm"], f"{r['step_s']:.3f}", f"{r['step_s'] / lora['step_s']:.3f}", str(r["ops"])]
        cells.append(f"{r['ops'] - lora['ops']:+d}" if r["ops"] is not None and lora["ops"] is not None else "-")
        if cuda:
            cells += [f"{r['peak_gib']:.2f}", f"{r['peak_gib'] / lora['peak_gib']:.3f}"]
            cells += [f"{r['train_gib']:.2f}", f"{r['train_gib'] / lora['train_gib']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Command line."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny Llama on CPU, a few steps (no GPU needed)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS)
    parser.add_argument("--steps", type=int, help="timed steps per arm (median; default 4, quick 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, help="sequences per step (default 4, quick 2)")
    parser.add_argument("--length", type=int, help="tokens per sequence (default 1024, quick 64)")
    parser.add_argument("--out", default="runs/bench_gpu")
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.quick else 4)
    args.batch = args.batch or (2 if args.quick else 4)
    args.length = args.length or (64 if args.quick else 1024)
    cuda = torch.cuda.is_available() and not args.quick
    if not cuda and not args.quick:
        sys.exit("bench_gpu.py: no CUDA device here; --quick runs the tiny CPU version")
    arms = ["lora", *[a for a in args.arms if a != "lora"]]  # LoRA first: every ratio is against it
    device, compute = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    name = torch.cuda.get_device_name(0) if cuda else "CPU (--quick)"
    log(f"building the {'Llama-3.1-8B' if cuda else 'tiny'}-shaped NF4 base on {name}")
    began = time.time()
    base = build_base(TINY if args.quick else LLAMA31_8B, device, compute)
    log(f"base ready in {time.time() - began:.0f} s")
    results = []
    for arm in arms:
        results.append(run_arm(arm, base, args, cuda))
        log(f"{arm}: {json.dumps(results[-1])}")
    collapsed = time_collapse(base, cuda)
    log(f"collapse: {json.dumps(collapsed)}")
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "peft", "bitsandbytes", "accelerate"):
        versions[package] = __import__(package).__version__
    text = "\n".join(
        [
            f"# benches/cost/bench_gpu.py{' --quick' if args.quick else ''} on {name}",
            ", ".join(f"{k} {v}" for k, v in versions.items()),
            f"batch {args.batch} x {args.length} tokens, {args.warmup} warm-up + {args.steps} timed steps (median)"
            " + 1 profiled step per arm",
            "",
            table(results, cuda),
            "",
            f"Collapse of {collapsed['modules']} modules ({collapsed['factors']} over-parameterized factors, capacity "
            f"1): {collapsed['seconds']:.2f} s, largest relative error of B A {collapsed['max_error']:.1e}",
        ]
    )
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"device": name, "versions": versions, "arms": results, "collapse": collapsed, "args": vars(args)}
    (out / "bench_gpu.json").write_text(json.dumps(payload, indent=1))
    (out / "bench_gpu.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
