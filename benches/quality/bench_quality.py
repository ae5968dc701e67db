"""Quality at equal training tokens, each method at its own best learning rate: SmolLM2-135M on GSM8K.

    python benches/quality/bench_quality.py --quick                           # tiny model, < 90 s, plumbing only
    python benches/quality/bench_quality.py --phase sweep --out runs/quality  # every method x --lrs, validation
    python benches/quality/bench_quality.py --phase final --out runs/quality  # best lr per method, seeds, test
    python benches/quality/bench_quality.py --phase all --out runs/quality --longer-steps 160

The model is the real SmolLM2-135M-Instruct (`lora_over_trl.utils.smollm2.smollm2_folder()`) in 4-bit NF4 on
CPU, as `lora_over_trl.sft` loads it; every method trains through TRL's `SFTTrainer` with
`peft_config=LoraConfig(r=..)` on every linear layer (the same rank for every method) and its own callback from
this package (`lora_over_trl.registry.build_callback`; the settings: `benchlib.methods.quality_callback`):

    lora                 plain PEFT LoRA (no callback)
    lora_over_static     LoraOverCallback(LoraOverConfig(capacity=1)), every module over-parameterized
    lora_over_dynamic    LoraOverCallback(LoraOverConfig(capacity=1, schedule="dynamic", budget_ratio=0.5, ...))
    cla                  ClaCallback(ClaConfig(method="cla"))
    c3la                 ClaCallback(ClaConfig(method="c3la")) at LoRA r/2 with 2 windows: collapsed rank r
    glora                GloraCallback(GloraConfig(ranks=[r])) + search_glora() on the validation split

Data: GSM8K train (`--gsm8k-dir`, by default the repository's sample `tests/data/gsm8k`, 2,000 train and 250 test
rows: enough for the defaults; a run that needs more rows stops and says so) shaped as lm-eval's prompt
("Question: ...\\nAnswer:") with the answer as completion (loss on the completion only). A fixed validation
split (`--n-val` rows) is carved out of the training file before anything else; a run trains one pass over
`steps x batch` rows drawn from the rest by its seed, so every method sees the same rows (the same training
tokens) for a given seed. Scores, on the collapsed adapter (float32 adapter weights for every method): the answer
NLL (mean per completion token, EOS included) on the validation split (sweep) or on the first `--n-test` GSM8K
test rows (final), and GSM8K exact match (greedy, `--max-new-tokens`, strict `#### N` and flexible last number)
on the first `--n-em` test questions (final only). The learning rate is chosen on the validation NLL, never on
the test split.

The orchestration is `benches/benchlib/quality.py`'s. Each run is a fresh subprocess (`--worker JSON`) writing
`<out>/runs/<key>.json`; runs whose JSON exists are skipped (resumable; a failed run records its error and is
retried next time). The sweep writes `<out>/sweep.json` (best lr per method), which `--phase final` reads. A
sweep run saves its collapsed adapter, so the final phase scores the sweep seed's run at the best lr on the test
split without training it again (GLoRA excepted: it is retrained). Tables print last, as Markdown; PNGs
(validation NLL against lr, loss curves at the best lr, the final comparison) land in `<out>/`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/, where benchlib lives
from benchlib.data import (  # noqa: E402
    answer_fits,
    answer_nll_rows,
    batch_order,
    encode_answers,
    exact_match,
    gsm8k_rows,
    gsm8k_splits,
    pooled_nll,
    prompt_completion,
    train_rows,
)
from benchlib.methods import (  # noqa: E402
    adapter_to_float32,
    finish_run,
    inference_rank,
    lora_rank,
    method_record,
    put_first,
    quality_callback,
    quiet_worker,
    reload_sweep_run,
    step_clock,
    training_arguments,
)
from benchlib.models import load_causal_base, save_tiny_llama  # noqa: E402
from benchlib.quality import (  # noqa: E402
    DEFAULT_METHODS,
    Bench,
    Metric,
    apply_defaults,
    arm_spec,
    common_parser,
    mean_of,
    orchestrate,
)

REUSE_CHECK_ROWS = 16  # validation rows re-scored when the final phase reloads a sweep adapter


def worker(spec: dict) -> None:
    """Train (or reload) one arm, score it, write ``spec['out']``."""
    quiet_worker(spec.get("threads", 1))
    began = time.time()
    pool, val = gsm8k_splits(spec["gsm8k_dir"], spec["n_val"])
    test = gsm8k_rows(spec["gsm8k_dir"], "test", max(spec["n_test"], spec["n_em"]), "--n-test/--n-em")
    model, tokenizer = load_causal_base(spec)
    loaded_s = time.time() - began
    result: dict = {"spec": spec, "load_seconds": round(loaded_s, 1)}
    if spec.get("reuse"):
        model, trained = reload_sweep_run(model, spec, result)
    else:
        result.update(train_causal(spec, model, tokenizer, pool, val))
        model = result.pop("_model")
    adapter_to_float32(model)
    result["inference_rank"] = inference_rank(model)
    scoring = time.time()
    scores: dict[str, float] = {}
    if spec["split"] == "validation":
        sums = answer_nll_rows(model, tokenizer, val, spec["max_length"], spec["eval_batch"])
        scores["val_nll"] = pooled_nll(sums)
        result["val_nll_check"] = pooled_nll(sums[:REUSE_CHECK_ROWS])
    if spec.get("reuse"):  # the reloaded adapter must be the function the sweep scored: a few rows tell
        check = answer_nll_rows(model, tokenizer, val[:REUSE_CHECK_ROWS], spec["max_length"], spec["eval_batch"])
        result["reuse_val_nll_diff"] = pooled_nll(check) - trained["val_nll_check"]
    if spec["split"] == "test":
        sums = answer_nll_rows(model, tokenizer, test[: spec["n_test"]], spec["max_length"], spec["eval_batch"])
        scores["test_nll"], result["test_tokens"] = pooled_nll(sums), sum(c for _, c in sums)
        em = exact_match(model, tokenizer, test[: spec["n_em"]], spec["max_new_tokens"], spec["gen_batch"])
        scores["em_strict"], scores["em_flexible"] = em["em_strict"], em["em_flexible"]
        result["em_samples"] = em["samples"]
    finish_run(spec, result, scores, model, began, scoring)


def train_causal(spec: dict, model, tokenizer, pool: list[dict], val: list[dict]) -> dict:
    """SFT one arm with TRL's SFTTrainer and the method's callback; returns the record (and ``_model``)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    method, steps = spec["method"], spec["steps"]

    rows = train_rows(pool, spec["seed"], steps * spec["batch"], answer_fits(tokenizer, spec["max_length"]))
    lengths = [len(ids) for ids, _ in encode_answers(tokenizer, rows, spec["max_length"])]
    rows = [rows[i] for i in batch_order(lengths, spec["batch"], spec["seed"])]
    train = Dataset.from_list([prompt_completion(r) for r in rows])
    rank = lora_rank(method, spec["rank"])
    peft_config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    args = training_arguments(
        SFTConfig, spec, steps, steps // 20, bf16=False, max_length=spec["max_length"], activation_checkpointing=False
    )
    callback = quality_callback(method, steps, spec["seed"], spec.get("glora", {}))
    clock = step_clock()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset={"validation": Dataset.from_list([prompt_completion(r) for r in val])}
        if method == "glora"
        else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback, clock] if callback is not None else [clock],
    )
    put_first(trainer, callback)
    if len(trainer.train_dataset) != len(rows):
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(rows)} training rows: not one epoch")
    output = trainer.train()
    history = trainer.state.log_history
    record = {
        "curve": [[h["step"], h["loss"]] for h in history if "loss" in h],
        "train": {
            "seconds": round(output.metrics.get("train_runtime", math.nan), 1),
            "step_seconds": clock.seconds,
            "step_seconds_median": statistics.median(clock.seconds[1:] or clock.seconds),
            "tokens": max((float(h["num_tokens"]) for h in history if "num_tokens" in h), default=None),
            "rows": len(rows),
            "trainable_params": clock.trainable,
            "trainable_dtypes": clock.dtypes,
            "lora_r": rank,
            "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        },
    }
    record["train"].update(method_record(trainer, callback, spec))
    record["_model"] = trainer.model
    return record


def causal_spec(args: argparse.Namespace, method: str, lr: float, seed: int, steps: int, split: str) -> dict:
    """The worker's settings for one GSM8K arm."""
    return {
        "bench": "gsm8k",
        **arm_spec(args, method, lr, seed, steps, split),
        "n_em": args.n_em,
        "max_new_tokens": args.max_new_tokens,
        "gen_batch": args.gen_batch,
    }


def main() -> None:
    """Command line: orchestrator, or ``--worker JSON`` for one run."""
    parser = common_parser(__doc__)
    parser.add_argument("--max-length", type=int, help="tokens per training/scored row")
    parser.add_argument("--n-val", type=int, help="validation rows carved from GSM8K train")
    parser.add_argument("--n-test", type=int, help="GSM8K test rows scored by answer NLL")
    parser.add_argument("--n-em", type=int, help="GSM8K test questions scored by exact match")
    parser.add_argument("--max-new-tokens", type=int, help="greedy generation length for exact match")
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--gen-batch", type=int, default=50, help="questions generated together")
    parser.add_argument("--glora-ranks", type=int, nargs="+", help="GLoRA's LoRA ranks on offer (default: [rank])")
    parser.add_argument("--model-dir", help="a model folder instead of SmolLM2-135M-Instruct (for trying things)")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.quick:
        defaults = dict(
            methods=["lora", "lora_over_static"], lrs=[1e-3, 1e-2], seeds=[0], steps=4, batch=2, rank=4,
            n_val=8, n_test=8, n_em=4, max_new_tokens=8, out="runs/bench_quality_quick", max_length=128,
            glora_search=[4, 1], glora_batches=1, extend_edges=0,
        )  # fmt: skip
    else:
        defaults = dict(
            methods=DEFAULT_METHODS, lrs=[3e-4, 1e-3, 3e-3, 1e-2], steps=12, batch=4, rank=16,
            n_val=48, n_test=48, n_em=24, max_new_tokens=160, out="runs/bench_quality", max_length=384,
            glora_search=[6, 2], glora_batches=1, extend_edges=2,
        )  # fmt: skip
    apply_defaults(args, defaults)
    if args.quick and args.model_dir is None:
        args.model_dir = save_tiny_llama(Path(args.out) / "tiny-llama", gsm8k_dir=args.gsm8k_dir)
    elif args.model_dir is None:
        from lora_over_trl.utils.smollm2 import smollm2_folder

        args.model_dir = str(smollm2_folder())
    args.glora_ranks = args.glora_ranks or [args.rank]
    bench = Bench(
        script=Path(__file__).resolve(),
        title="SmolLM2-135M-Instruct NF4, SFT on GSM8K" if not args.quick else "quick: tiny Llama, GSM8K",
        selection=Metric("val_nll", "answer NLL", higher_better=False),
        finals=[
            Metric("test_nll", "answer NLL", higher_better=False),
            Metric("em_strict", "EM strict", higher_better=True, digits=3, items="n_em"),
            Metric("em_flexible", "EM flexible", higher_better=True, digits=3, items="n_em"),
        ],
        spec=causal_spec,
        extra_final_columns=[
            ("train tokens", mean_of("tokens")),
            ("trainable", mean_of("trainable_params")),
            ("s/step", lambda runs: mean_of("step_seconds_median", 2)(runs)),
        ],
        notes=[
            f"model {args.model_dir}; LoRA r={args.rank} (alpha 2r) on every linear layer, batch {args.batch}, "
            f"max_length {args.max_length}, cosine schedule, AdamW, {args.threads} thread(s); validation "
            f"{args.n_val} rows of GSM8K train, test NLL on {args.n_test} and exact match on {args.n_em} GSM8K "
            f"test questions (greedy, {args.max_new_tokens} new tokens). Verdict: |Δ| < 2 * noise is 'within noise' "
            "(noise: pooled std / sqrt(seeds); for exact match at least sqrt(2 p (1 - p) / questions)).",
        ],
    )
    orchestrate(bench, args)


if __name__ == "__main__":
    main()
