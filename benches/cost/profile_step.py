"""Where LoRA-Over's step overhead over PEFT LoRA goes, by category, in one process.

    python benches/cost/profile_step.py --threads 1 --repeats 7 [--no-checkpointing] [--capacity 1.0]

SmolLM2-135M-Instruct in 4-bit NF4, LoRA r=16 on every linear layer, real GSM8K text (`--gsm8k-dir`), batch
2 x 128, AdamW. One model; the step is timed as plain LoRA, then with LoRA-Over installed (the LoRA weights copied
into the bank: the same function), alternating the two over ``--repeats`` rounds; medians. Categories of the
difference:

- contraction: the bank's forward (one batched contraction per layout, the slices handed to the LoRA
  weights) and its backward (stacking the slices' gradients, the contraction's backward), timed alone on
  the step's own gradients;
- optimizer: ``optimizer.step()`` + ``zero_grad`` of LoRA-Over minus LoRA's (one flat tensor against two per
  module);
- the rest: the LoRA path reading slices instead of parameters, and Python/dispatch: the step's difference
  minus the two above.

Aten operation counts (one profiled step each) are printed per category too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/, where benchlib lives
from benchlib.cost import aten_ops as aten_count  # noqa: E402
from benchlib.cost import smollm2_nf4  # noqa: E402
from benchlib.data import add_gsm8k_dir, gsm8k_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--capacity", type=float, default=1.0)
    parser.add_argument("--no-checkpointing", action="store_true")
    add_gsm8k_dir(parser)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from lora_over_trl import LoraOverConfig, apply_lora_over, collapse
    from lora_over_trl.lora_over.model import banks

    torch.set_num_threads(args.threads)
    model, folder = smollm2_nf4(torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    if not args.no_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows = gsm8k_rows(args.gsm8k_dir, "train", 2)
    enc = tokenizer([r["question"] + "\n" + r["answer"] for r in rows], return_tensors="pt", padding="max_length",
                    truncation=True, max_length=128)  # fmt: skip

    def timed_step(optimizer) -> tuple[float, float]:
        begin = time.perf_counter()
        model(**enc, labels=enc["input_ids"]).loss.backward()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - begin, time.perf_counter() - middle

    def arm(over: bool):
        if over:
            apply_lora_over(model, LoraOverConfig(capacity=args.capacity))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        timed_step(optimizer)  # warm-up: optimizer state, allocator
        times = [timed_step(optimizer) for _ in range(3)]
        ops = aten_count(lambda: timed_step(optimizer))
        optimizer_ops = 0
        if over:
            model(**enc, labels=enc["input_ids"]).loss.backward()
            optimizer_ops = aten_count(optimizer.step)
            optimizer.zero_grad(set_to_none=True)
            contraction, contraction_ops = contraction_cost(next(iter(banks(model).values())))
            collapse(model)
        else:
            model(**enc, labels=enc["input_ids"]).loss.backward()
            optimizer_ops = aten_count(optimizer.step)
            optimizer.zero_grad(set_to_none=True)
            contraction, contraction_ops = 0.0, 0
        return times, ops, optimizer_ops, contraction, contraction_ops

    def contraction_cost(bank) -> tuple[float, int]:
        grads = {key: torch.randn_like(bank.weight_of(key)) for key in bank.layouts}

        def once() -> None:
            bank.refresh()
            keys = sorted(bank.layouts)
            torch.autograd.backward([bank.weight_of(k) for k in keys], [grads[k] for k in keys])
            bank.storage.grad = None

        once()
        samples = []
        for _ in range(5):
            begin = time.perf_counter()
            once()
            samples.append(time.perf_counter() - begin)
        return statistics.median(samples), aten_count(once)

    rounds = {False: [], True: []}
    for repeat in range(args.repeats):
        for over in (False, True) if repeat % 2 == 0 else (True, False):
            rounds[over].append(arm(over))
    factors = 2 * sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))

    def med(over: bool, pick) -> float:
        return statistics.median(pick(r) for r in rounds[over])

    step = {o: med(o, lambda r: statistics.median(t[0] for t in r[0])) for o in rounds}
    optim = {o: med(o, lambda r: statistics.median(t[1] for t in r[0])) for o in rounds}
    contraction = med(True, lambda r: r[3])
    ops = {o: rounds[o][0][1] for o in rounds}
    optim_ops = {o: rounds[o][0][2] for o in rounds}
    contraction_ops = rounds[True][0][4]
    delta = step[True] - step[False]
    print(
        f"\nLoRA-Over (capacity {args.capacity:g}) step overhead over LoRA, SmolLM2-135M NF4 r=16 all-linear, batch "
        f"2x128, activation checkpointing {not args.no_checkpointing}, {args.threads} threads, {args.repeats} "
        f"rounds; {factors} factors"
    )
    print(f"LoRA step {step[False] * 1e3:.1f} ms, LoRA-Over {step[True] * 1e3:.1f} ms: {step[True] / step[False]:.3f}x")
    print(f"{'category':<34}{'ms/step':>9}{'% of LoRA step':>16}{'aten ops':>10}{'ops/factor':>11}")
    rest_ops = ops[True] - ops[False] - contraction_ops - (optim_ops[True] - optim_ops[False])
    rows = [
        ("contraction (forward + backward)", contraction, contraction_ops),
        ("optimizer step (difference)", optim[True] - optim[False], optim_ops[True] - optim_ops[False]),
        ("rest: LoRA path, Python/dispatch", delta - contraction - (optim[True] - optim[False]), rest_ops),
        ("total", delta, ops[True] - ops[False]),
    ]
    for name, seconds, count in rows:
        share = 100 * seconds / step[False]
        print(f"{name:<34}{seconds * 1e3:>9.2f}{share:>16.2f}{count:>10,}{count / factors:>11.2f}")


if __name__ == "__main__":
    main()
