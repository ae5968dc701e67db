"""MT-Bench answers in FastChat's ``model_answer`` format, for FastChat's judge to score.

80 two-turn questions (Zheng et al., 2023, "Judging LLM-as-a-Judge"). Each question is answered with the
model's own chat template: turn 1 alone, then turn 2 after the model's first answer. Sampling temperature
per category follows FastChat's ``gen_model_answer.py`` (0.0 for math, coding, reasoning and extraction,
0.1 for STEM and humanities, 0.7 for writing and roleplay). Output lines:
``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp"}``.
Questions: FastChat's ``question.jsonl`` (a local file; the hub copy is ``lmsys/mt_bench_human_judgments``).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import torch

__all__ = ["TEMPERATURE", "read_questions", "generate_answers", "write_answers"]

TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}


def read_questions(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Questions from a FastChat ``question.jsonl``; each needs ``question_id``, ``category`` and ``turns``."""
    questions = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"question_id", "category", "turns"} - set(row)
        if missing:
            raise ValueError(f"{path}:{number}: an MT-Bench question needs {sorted(missing)}")
        questions.append(row)
    if not questions:
        raise ValueError(f"{path}: no MT-Bench questions")
    return questions[:limit] if limit else questions


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: list[dict[str, Any]],
    model_id: str,
    *,
    max_new_tokens: int = 1024,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Answer every question, turn by turn, with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("MT-Bench needs a tokenizer with a chat template (tokenizer.chat_template is empty)")
    device = next(model.parameters()).device
    answers = []
    for question in questions:
        torch.manual_seed(seed + int(question["question_id"]))
        temperature = TEMPERATURE.get(question["category"], 0.7)
        messages: list[dict[str, str]] = []
        turns = []
        for turn in question["turns"]:
            messages.append({"role": "user", "content": turn})
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            input_ids = (prompt["input_ids"] if hasattr(prompt, "keys") else prompt).to(device)
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 1e-4 else {"do_sample": False}
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                **sampling,
            )
            text = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
            messages.append({"role": "assistant", "content": text})
            turns.append(text)
        answers.append(
            {
                "question_id": question["question_id"],
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "choices": [{"index": 0, "turns": turns}],
                "tstamp": time.time(),
            }
        )
    return answers


def write_answers(answers: list[dict[str, Any]], path: str | Path) -> Path:
    """Write one JSON line per answer (FastChat reads ``data/mt_bench/model_answer/<model_id>.jsonl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(answer) + "\n" for answer in answers))
    return path
