"""GSM8K for the benchmarks: its rows (``--gsm8k-dir``), seeded row choice and batch order, lm-eval's prompt, and
the two GSM8K scores (answer NLL, exact match).

The default folder is the sample the repository ships (``tests/data/gsm8k``: the first 2,000 train and 250 test
rows); ``--gsm8k-dir`` points a run at the full data set (a folder with ``train.jsonl`` and ``test.jsonl``). A run
that needs more rows than the folder holds stops with one line naming the flag and the rows there are.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from benchlib import ROOT

GSM8K_DIR = ROOT / "tests" / "data" / "gsm8k"
PROMPT = "Question: {question}\nAnswer:"
SPLIT_SEED = 1234  # the validation carve-out: fixed, whatever the run's seed


def add_gsm8k_dir(parser: argparse.ArgumentParser) -> None:
    """The ``--gsm8k-dir`` flag every script reading GSM8K takes."""
    parser.add_argument(
        "--gsm8k-dir",
        default=str(GSM8K_DIR),
        help="folder with GSM8K's train.jsonl and test.jsonl (default: the repository's sample, "
        "tests/data/gsm8k: 2,000 train and 250 test rows)",
    )


def gsm8k_rows(folder: str | Path, split: str, count: int | None = None, flag: str | None = None) -> list[dict]:
    """The first ``count`` rows (all without ``count``) of ``<folder>/<split>.jsonl``.

    Raises:
        SystemExit: the file holds fewer than ``count`` rows (the message names ``flag``, what asked for them).
    """
    path = Path(folder) / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"--gsm8k-dir: {path} not found")
    with path.open() as handle:
        rows = [json.loads(line) for line in itertools.islice(handle, count)]
    if count is not None and len(rows) < count:
        raise SystemExit(
            f"{flag or 'this run'} needs {count} GSM8K {split} rows; {path} has {len(rows)} "
            "(lower it, or point --gsm8k-dir at the full data set)"
        )
    return rows


def gsm8k_splits(folder: str | Path, n_val: int) -> tuple[list[dict], list[dict]]:
    """(training pool, validation) carved from GSM8K train by a fixed shuffle; the test file is not touched."""
    rows = gsm8k_rows(folder, "train")
    if n_val >= len(rows):
        raise SystemExit(f"--n-val {n_val}: {folder}/train.jsonl has {len(rows)} rows, leaving none to train on")
    random.Random(SPLIT_SEED).shuffle(rows)
    return rows[n_val:], rows[:n_val]


def train_rows(
    pool: list[dict], seed: int | str, count: int, keep: Callable[[dict], bool] = lambda row: True
) -> list[dict]:
    """``count`` training rows drawn by ``seed`` among those ``keep`` accepts (every method sees the same rows
    for one seed).

    Raises:
        SystemExit: the pool holds fewer than ``count`` such rows.
    """
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    chosen = []
    for index in order:
        if len(chosen) == count:
            break
        if keep(pool[index]):
            chosen.append(pool[index])
    if len(chosen) < count:
        raise SystemExit(
            f"the run trains on {count} rows (--steps x --batch, or --train-rows); the training pool has "
            f"{len(chosen)} usable rows (use a larger data set, e.g. --gsm8k-dir with the full GSM8K)"
        )
    return chosen


def batch_order(lengths: list[int], batch: int, seed: int | str) -> list[int]:
    """Indices in training order: a seeded shuffle cut into groups of 16 batches, each group sorted by length
    (little padding), then the batches shuffled. The Trainer is given the rows in this order with a sequential
    sampler: its own samplers draw from the global torch RNG, which some methods' callbacks consume when they
    install (cLA, GLoRA), so the order would differ between methods."""
    rng = random.Random(f"order:{seed}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for begin in range(0, len(order), 16 * batch):
        group = sorted(order[begin : begin + 16 * batch], key=lambda i: -lengths[i])
        batches += [group[i : i + batch] for i in range(0, len(group), batch)]
    rng.shuffle(batches)
    return [i for b in batches for i in b]


def prompt_completion(row: dict) -> dict:
    """lm-eval's GSM8K prompt and the answer as completion."""
    return {"prompt": PROMPT.format(question=row["question"]), "completion": " " + row["answer"]}


def encode_answers(tokenizer, rows: list[dict], max_length: int) -> list[tuple[list[int], int]]:
    """(input ids, completion start) per row, tokenized as TRL does for prompt-completion data (EOS appended to
    the completion, the completion starting where prompt and prompt+completion diverge), cut at ``max_length``."""
    encoded = []
    for row in rows:
        pair = prompt_completion(row)
        prompt = tokenizer(pair["prompt"])["input_ids"]
        full = tokenizer(pair["prompt"] + pair["completion"] + tokenizer.eos_token)["input_ids"]
        start = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(prompt))
        encoded.append((full[:max_length], start))
    return encoded


def answer_fits(tokenizer, max_length: int) -> Callable[[dict], bool]:
    """Whether a row keeps at least one answer token within ``max_length`` (TRL drops the others)."""
    return lambda row: encode_answers(tokenizer, [row], max_length)[0][1] < max_length - 1


def answer_nll_rows(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> list[tuple[float, int]]:
    """Per row, in order: the summed NLL of its completion tokens (answer and EOS) and their count."""
    import torch
    import torch.nn.functional as F

    encoded = encode_answers(tokenizer, rows, max_length)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # batches of similar length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(order), batch_size):
            chunk = order[begin : begin + batch_size]
            width = max(len(encoded[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, index in enumerate(chunk):
                tokens, start = encoded[index]
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
                labels[row, start : len(tokens)] = torch.tensor(tokens[start:])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none").sum(1)
            for row, index in enumerate(chunk):
                sums[index] = (float(nll[row]), int((target[row] != -100).sum()))
    return sums


def pooled_nll(sums: list[tuple[float, int]]) -> float:
    """Mean NLL per token over rows' ``(sum, count)``."""
    return sum(s for s, _ in sums) / max(sum(c for _, c in sums), 1)


def answer_nll(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> float:
    """The pooled answer NLL of ``rows``."""
    return pooled_nll(answer_nll_rows(model, tokenizer, rows, max_length, batch_size))


_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")


def normalize_number(text: str) -> str:
    """A GSM8K answer as lm-eval compares it (no commas, dollars or trailing period; ``1.0`` as ``1``)."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return f"{value:g}"


def extract_answers(generation: str) -> tuple[str | None, str | None]:
    """(strict ``#### N``, flexible last number) of a generation, normalized (lm-eval's GSM8K filters)."""
    strict = _STRICT.search(generation)
    numbers = _NUMBER.findall(generation)
    return (
        normalize_number(strict.group(1)) if strict else None,
        normalize_number(numbers[-1]) if numbers else None,
    )


def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int) -> dict:
    """Greedy GSM8K exact match (strict and flexible) over ``rows``; also a few generations to read."""
    import torch

    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    strict_hits = flexible_hits = 0
    samples = []
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(rows), batch_size):
            chunk = rows[begin : begin + batch_size]
            enc = tokenizer([PROMPT.format(question=r["question"]) for r in chunk], return_tensors="pt", padding=True)
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row, new in zip(chunk, generated[:, enc["input_ids"].shape[1] :], strict=True):
                text = tokenizer.decode(new, skip_special_tokens=True)
                gold = normalize_number(row["answer"].split("####")[-1])
                strict, flexible = extract_answers(text)
                strict_hits += strict == gold
                flexible_hits += flexible == gold
                if len(samples) < 3:
                    samples.append({"question": row["question"][:200], "generation": text, "gold": gold})
    n = max(len(rows), 1)
    return {"em_strict": strict_hits / n, "em_flexible": flexible_hits / n, "n": len(rows), "samples": samples}
