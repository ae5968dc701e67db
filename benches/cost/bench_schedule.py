"""Cost of the dynamic capacity scheduler: step time of the dynamic schedule against a fixed allocation.

    python benches/cost/bench_schedule.py --repeats 3 --steps 16

SmolLM2-135M-Instruct in 4-bit NF4, LoRA r=16 on every linear layer, TRL SFTTrainer with LoraOverCallback,
real GSM8K text (`--gsm8k-dir`), batch 2 x 128, gradient checkpointing, fused AdamW (the Trainer's default). Both arms
spend the same budget of auxiliary parameters (budget_ratio) at the same capacity: ``prepass`` fixes the
modules once before training, ``dynamic`` measures sensitivity every step (gradient hooks, |W * dL/dW|) and
re-allocates every ``--interval`` steps; ``dynamic-levels3`` does the same with three capacity levels
(modules also grow and shrink between levels). The difference is what the scheduler costs. Each arm runs in
a fresh process; arms alternate; the table shows medians over repeats of the median step time (first two
steps excluded) and of the peak memory above the loaded model.
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


def worker(schedule: str, steps: int, interval: int, budget_ratio: float, gsm8k_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    from lora_over_trl import LoraOverCallback, LoraOverConfig
    from lora_over_trl.lora_over.model import banks

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.groups = self.factors = 0  # the most the bank held at a step's end

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.times.append(time.perf_counter() - self.begin)
            held = banks(model).values()
            self.groups = max(self.groups, sum(len(bank.groups) for bank in held))
            self.factors = max(self.factors, sum(len(bank.layouts) for bank in held))

    cuda = torch.cuda.is_available()
    model, folder = smollm2_nf4(torch.bfloat16 if cuda else torch.float32, "cuda" if cuda else "cpu")
    loaded = torch.cuda.memory_allocated() if cuda else peak_rss_reset()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows = gsm8k_rows(gsm8k_dir, "train", 256)
    data = Dataset.from_list([{"text": r["question"] + "\n" + r["answer"]} for r in rows])
    schedule, _, levels = schedule.partition("-levels")
    config = LoraOverConfig(
        capacity=1.0,
        schedule=schedule,
        budget_ratio=budget_ratio,
        interval=interval,
        warmup_steps=2,
        final_steps=0,  # re-allocate to the end, as the recorded tables did (the default freezes the last 20%)
        prepass_batches=2,
        levels=int(levels or 1),
    )
    timer, callback = StepTimer(), LoraOverCallback(config)
    with tempfile.TemporaryDirectory() as out:
        args = sft_step_config(out, steps, cuda)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=AutoTokenizer.from_pretrained(folder),
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
            callbacks=[callback, timer],
        )
        trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else status_kb("VmHWM") * 1024
    device = torch.cuda.get_device_name() if cuda else "cpu"
    moves = [entry["seconds"] for entry in callback.history if entry["event"] == "reallocate"]
    return {
        "step_s": statistics.median(timer.times[2:]),
        "mean_step_s": statistics.mean(timer.times[2:]),
        "move_s": sum(moves) / len(timer.times),  # re-allocation time per step, averaged over all steps
        "groups": timer.groups,
        "factors": timer.factors,
        "train_bytes": peak - loaded,
        "device": device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--budget-ratio", type=float, default=0.5)
    add_gsm8k_dir(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.interval, args.budget_ratio, args.gsm8k_dir)))
        return
    arms = ["prepass", "dynamic", "dynamic-levels3"]
    results = run_alternating(
        __file__,
        arms,
        args.repeats,
        ["--steps", str(args.steps), "--interval", str(args.interval), "--budget-ratio", str(args.budget_ratio)]
        + ["--gsm8k-dir", args.gsm8k_dir],
    )
    base = statistics.median(r["step_s"] for r in results["prepass"])
    print(
        f"\nscheduler cost, SmolLM2-135M NF4, r=16 all-linear, budget_ratio {args.budget_ratio:g}, capacity 1, "
        f"{args.steps} steps, interval {args.interval}, {args.repeats} repeats, "
        f"device {results['prepass'][0]['device']}"
    )
    print("train MiB: peak memory above the loaded model (CPU: resident set; CUDA: max allocated)")
    print("mean s: mean step (the median hides the re-allocation steps); move s: re-allocation time per step")
    print(
        f"{'schedule':<16}{'step s':>9}{'x fixed':>9}{'mean s':>9}{'x fixed':>9}{'move s':>9}"
        f"{'groups':>8}{'factors':>9}{'train MiB':>11}{'x fixed':>9}"
    )
    base_mean = statistics.median(r["mean_step_s"] for r in results["prepass"])
    base_memory = statistics.median(r["train_bytes"] for r in results["prepass"])
    for arm in arms:
        step = statistics.median(r["step_s"] for r in results[arm])
        memory = statistics.median(r["train_bytes"] for r in results[arm])
        mean = statistics.median(r["mean_step_s"] for r in results[arm])
        move = statistics.median(r["move_s"] for r in results[arm])
        groups = statistics.median(r["groups"] for r in results[arm])
        factors = statistics.median(r["factors"] for r in results[arm])
        print(
            f"{arm:<16}{step:>9.3f}{step / base:>9.3f}{mean:>9.3f}{mean / base_mean:>9.3f}{move:>9.3f}"
            f"{groups:>8g}{factors:>9g}{memory / 2**20:>11.1f}{memory / base_memory:>9.3f}"
        )


if __name__ == "__main__":
    main()
