"""Training cost of every method against PEFT LoRA of the same rank, each through its own callback.

    python benches/cost/bench_methods.py --repeats 3 --steps 16
    python benches/cost/bench_methods.py --quick                     # a tiny Llama, seconds: keeps the script alive

SmolLM2-135M-Instruct in 4-bit NF4 (bfloat16 compute on CUDA, float32 on CPU), LoRA r=16 on every linear
layer, TRL SFTTrainer, real GSM8K text (`--gsm8k-dir`), batch 2 x 128, gradient checkpointing, AdamW
(``--optim``, by default the Trainer's own default, ``adamw_torch_fused``). Arms, each through its callback from
``lora_over_trl.registry.build_callback`` (``SETTINGS`` below):

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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/, where benchlib lives
from benchlib.cost import peak_rss_reset, run_alternating, sft_step_config, smollm2_nf4, status_kb  # noqa: E402
from benchlib.data import add_gsm8k_dir, gsm8k_rows  # noqa: E402
from benchlib.methods import method_callback  # noqa: E402
from benchlib.models import save_tiny_llama  # noqa: E402

ARMS = ["lora", "lora-over", "lora-over-dynamic", "cla", "c3la", "glora"]


# Each arm's settings on top of what its label stands for (benchlib.methods.LABELS): a chain step every 4 steps,
# a re-allocation every 4 steps, GLoRA's ranks 8 and 16.
SETTINGS: dict[str, dict] = {
    "lora-over-dynamic": {"budget_ratio": 0.5, "interval": 4, "warmup_steps": 2, "final_steps": 0},
    "cla": {"chain_interval": 4},
    "c3la": {"chain_interval": 4},
    "glora": {"ranks": [8, 16]},
}


def load_model(quick: bool, gsm8k_dir: str):
    """``(model, tokenizer, device name)``: SmolLM2-135M-Instruct in NF4, or (``quick``) a tiny fp32 Llama."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quick:
        folder = save_tiny_llama(tempfile.mkdtemp(prefix="bench-methods-"), gsm8k_dir=gsm8k_dir)
        return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), "cpu"
    cuda = torch.cuda.is_available()
    model, folder = smollm2_nf4(torch.bfloat16 if cuda else torch.float32, "cuda" if cuda else "cpu")
    if not cuda:
        from lora_over_trl import keep_cpu_4bit_layout

        keep_cpu_4bit_layout(model)
    return model, AutoTokenizer.from_pretrained(folder), torch.cuda.get_device_name() if cuda else "cpu"


def worker(arm: str, steps: int, quick: bool, optim: str, gsm8k_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTTrainer

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
    model, tokenizer, device = load_model(quick, gsm8k_dir)
    rows = gsm8k_rows(gsm8k_dir, "train", 256)
    data = Dataset.from_list([{"text": r["question"] + "\n" + r["answer"]} for r in rows])
    if cuda:  # from here on: what training adds to the loaded model
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    else:
        start_mem = peak_rss_reset()
    timer = StepTimer()
    callback = method_callback(arm, SETTINGS.get(arm))
    with tempfile.TemporaryDirectory() as out:
        args = sft_step_config(out, steps, cuda, optim)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
            callbacks=[timer] if callback is None else [callback, timer],
        )
        trainer.train()
    total = torch.cuda.max_memory_allocated() if cuda else status_kb("VmHWM") * 1024
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
    add_gsm8k_dir(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 4
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.quick, args.optim, args.gsm8k_dir)))
        return
    arms = ["lora"] + [a for a in args.arms if a != "lora"]
    extra = ["--steps", str(args.steps), "--optim", args.optim, "--gsm8k-dir", args.gsm8k_dir]
    extra += ["--quick"] if args.quick else []
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
