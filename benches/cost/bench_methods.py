"""Training cost of every method against PEFT LoRA of the same rank, each through its own callback.

    python benches/bench_methods.py --repeats 3 --steps 16
    python benches/bench_methods.py --quick                     # a tiny Llama, seconds: keeps the script alive

SmolLM2-135M-Instruct in 4-bit NF4 (bfloat16 compute on CUDA, float32 on CPU), LoRA r=16 on every linear
layer, TRL SFTTrainer, real GSM8K text, batch 2 x 128, gradient checkpointing, AdamW (``--optim``, by default
the Trainer's own default, ``adamw_torch_fused``). Arms:

- ``lora``: plain PEFT LoRA (the reference);
- ``lora-over``: LoRA-Over, static, capacity 1 on every factor;
- ``lora-over-dynamic``: LoRA-Over with the dynamic scheduler (budget_ratio 0.5, re-allocation every 4 steps:
  sensitivity hooks, moves and optimizer regrouping all inside the timed steps);
- ``cla``: B only, A a fixed column window (a gather);
- ``c3la``: chained cLA, a chain step every 4 steps (the frozen part grows to 3 windows in 16 steps);
- ``glora``: the GLoRA supernet (ranks 8 and 16 on offer), a fresh choice per layer every step.

Step time: the median step (first two excluded). Memory: peak above the loaded model (optimizer state,
gradients, activations, what a method installs) and the whole-process peak; on CPU the resident-set
high-water mark, on CUDA ``max_memory_allocated``. Every arm runs in a fresh process; arms alternate; the
table shows medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from alternate import run_alternating
from bench_core import _status_kb, peak_rss_reset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
ARMS = ["lora", "lora-over", "lora-over-dynamic", "cla", "c3la", "glora"]


def method_callback(arm: str):
    """The callback that turns a LoRA run into ``arm`` (``None`` for plain LoRA)."""
    from lora_over_trl import ClaCallback, ClaConfig, GloraCallback, GloraConfig, LoraOverCallback, LoraOverConfig

    if arm == "lora":
        return None
    if arm == "lora-over":
        return LoraOverCallback(LoraOverConfig(capacity=1.0))
    if arm == "lora-over-dynamic":
        config = LoraOverConfig(
            capacity=1.0, schedule="dynamic", budget_ratio=0.5, interval=4, warmup_steps=2, final_steps=0
        )
        return LoraOverCallback(config)
    if arm in ("cla", "c3la"):
        return ClaCallback(ClaConfig(method=arm, chain_interval=4))
    if arm == "glora":
        return GloraCallback(GloraConfig(ranks=[8, 16]))
    raise ValueError(f"unknown arm {arm!r}; allowed: {ARMS}")


def load_model(quick: bool):
    """``(model, tokenizer, device name)``: SmolLM2-135M-Instruct in NF4, or (``quick``) a tiny fp32 Llama."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if quick:
        from tiny_model import save_tiny_llama

        folder = save_tiny_llama(tempfile.mkdtemp(prefix="bench-methods-"))
        return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), "cpu"
    from lora_over_trl.utils.smollm2 import smollm2_folder

    cuda = torch.cuda.is_available()
    compute = torch.bfloat16 if cuda else torch.float32
    folder = smollm2_folder()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, dtype=compute, device_map="cuda" if cuda else "cpu"
    )
    if not cuda:
        from lora_over_trl import keep_cpu_4bit_layout

        keep_cpu_4bit_layout(model)
    return model, AutoTokenizer.from_pretrained(folder), torch.cuda.get_device_name() if cuda else "cpu"


def worker(arm: str, steps: int, quick: bool, optim: str = "adamw_torch_fused") -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.begin)
            # what trains in this step (LoRA-Over's cores, a chain's current B, the whole GLoRA supernet)
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    cuda = torch.cuda.is_available() and not quick
    model, tokenizer, device = load_model(quick)
    rows = [json.loads(line) for _, line in zip(range(256), DATA.open(), strict=False)]
    data = Dataset.from_list([{"text": r["question"] + "\n" + r["answer"]} for r in rows])
    if cuda:  # from here on: what training adds to the loaded model
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    else:
        start_mem = peak_rss_reset()
    timer = StepTimer()
    callback = method_callback(arm)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
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
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
            callbacks=[timer] if callback is None else [callback, timer],
        )
        trainer.train()
    total = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    return {
        "step_s": statistics.median(timer.times[2:]),
        "train_bytes": total - start_mem,
        "total_bytes": total,
        "loaded_bytes": start_mem,
        "trainable": timer.trainable,
        "device": device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--quick", action="store_true", help="a tiny fp32 Llama, 1 repeat, 4 steps")
    parser.add_argument("--optim", default="adamw_torch_fused", help="the Trainer's `optim` (default: its default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 4
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.quick, args.optim)))
        return
    arms = ["lora"] + [a for a in args.arms if a != "lora"]
    extra = ["--steps", str(args.steps), "--optim", args.optim] + (["--quick"] if args.quick else [])
    results = run_alternating(__file__, arms, args.repeats, extra)

    def median(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in results[arm])

    model = "tiny Llama fp32 (--quick)" if args.quick else "SmolLM2-135M NF4"
    print(
        f"\ntraining cost by method, {model}, r=16 all-linear, batch 2x128, grad. checkpointing, "
        f"{args.steps} steps, {args.repeats} repeats, optim {args.optim}, device {results['lora'][0]['device']}"
    )
    print(
        "train MiB: peak above the loaded model; total MiB: whole-process peak (CPU: resident set; CUDA: max "
        "allocated); loaded MiB: the model before training (the same code in every arm);\n"
        "trainable: parameters that train in the last step (before any collapse)"
    )
    print(
        f"{'method':<19}{'trainable':>12}{'step s':>9}{'x LoRA':>8}{'train MiB':>11}{'x LoRA':>8}"
        f"{'total MiB':>11}{'x LoRA':>8}{'loaded MiB':>12}"
    )
    for arm in arms:
        print(
            f"{arm:<19}{results[arm][0]['trainable']:>12,}{median(arm, 'step_s'):>9.3f}"
            f"{median(arm, 'step_s') / median('lora', 'step_s'):>8.3f}"
            f"{median(arm, 'train_bytes') / 2**20:>11.1f}"
            f"{median(arm, 'train_bytes') / median('lora', 'train_bytes'):>8.3f}"
            f"{median(arm, 'total_bytes') / 2**20:>11.1f}"
            f"{median(arm, 'total_bytes') / median('lora', 'total_bytes'):>8.3f}"
            f"{median(arm, 'loaded_bytes') / 2**20:>12.1f}"
        )


if __name__ == "__main__":
    main()
