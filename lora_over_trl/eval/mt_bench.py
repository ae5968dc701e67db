"""MT-Bench: answers generated as FastChat's ``gen_model_answer.py`` generates them, then judged and scored.

80 two-turn questions (Zheng et al., 2023, "Judging LLM-as-a-Judge"), FastChat's ``question.jsonl`` by default
(:mod:`lora_over_trl.eval.fastchat_data`). Each question is answered with the model's own chat template: turn 1
alone, then turn 2 after the model's own turn-1 answer. Sampling per category is FastChat's ``temperature_config``
(greedy for math, coding, reasoning and extraction; 0.1 for STEM and humanities; 0.7 for writing, roleplay and any
other category), up to 1024 new tokens (``--max-new-token``'s default); ``tests/test_mt_bench.py`` holds both to
the judge package's own values. The folder layout is FastChat's: ``model_answer/<model_id>.jsonl`` (lines
``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp"}``) and
``model_judgment/<judge>_single.jsonl`` / ``<judge>_pair.jsonl``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_over_trl.eval.fastchat_data import JUDGE_PACKAGE, questions_file
from lora_over_trl.eval.judge import JudgeSettings, connect, judgment_files, make_matches, run_matches
from lora_over_trl.eval.judge_results import (
    pairwise_rates,
    plot_categories,
    read_rows,
    results_markdown,
    single_scores,
)

__all__ = [
    "TEMPERATURE",
    "MAX_NEW_TOKENS",
    "read_questions",
    "answer_questions",
    "hf_generator",
    "vllm_generator",
    "write_answers",
    "read_answers",
    "answer_files",
    "judge_folder",
]

# FastChat's temperature_config (llm_judge/common.py); categories not listed are sampled at 0.7
TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7
MAX_NEW_TOKENS = 1024

# generate(conversations, temperatures) -> one reply per conversation (chat messages, ending with a user turn)
Generator = Callable[[list[list[dict[str, str]]], list[float]], list[str]]


def read_questions(path: str | Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Questions from a FastChat ``question.jsonl`` (FastChat's own 80 when ``path`` is None); each needs
    ``question_id``, ``category`` and ``turns``."""
    if path is None:
        path = questions_file()
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


def answer_questions(questions: list[dict[str, Any]], generate: Generator, model_id: str) -> list[dict[str, Any]]:
    """Every question answered turn by turn: all first turns in one batch, then all second turns, each built on the
    model's own first answer. Returns FastChat ``model_answer`` rows."""
    conversations: list[list[dict[str, str]]] = [[] for _ in questions]
    temperatures = [TEMPERATURE.get(q["category"], DEFAULT_TEMPERATURE) for q in questions]
    for turn in range(max(len(q["turns"]) for q in questions)):
        asked = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        for i in asked:
            conversations[i].append({"role": "user", "content": questions[i]["turns"][turn]})
        replies = generate([conversations[i] for i in asked], [temperatures[i] for i in asked])
        for i, reply in zip(asked, replies, strict=True):
            conversations[i].append({"role": "assistant", "content": reply})
    return [
        {
            "question_id": question["question_id"],
            "answer_id": uuid.uuid4().hex,
            "model_id": model_id,
            "choices": [{"index": 0, "turns": [m["content"] for m in conversation if m["role"] == "assistant"]}],
            "tstamp": time.time(),
        }
        for question, conversation in zip(questions, conversations, strict=True)
    ]


def hf_generator(model: Any, tokenizer: Any, *, max_new_tokens: int = MAX_NEW_TOKENS, seed: int = 0) -> Generator:
    """Replies from transformers' ``generate``, one conversation at a time, through the tokenizer's chat template
    (greedy below temperature 1e-4, as FastChat decides)."""
    import torch

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("MT-Bench needs a tokenizer with a chat template (tokenizer.chat_template is empty)")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def generate(conversations: list[list[dict[str, str]]], temperatures: list[float]) -> list[str]:
        replies = []
        for messages, temperature in zip(conversations, temperatures, strict=True):
            torch.manual_seed(seed)  # FastChat seeds every question's answer alike
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            input_ids = (prompt["input_ids"] if hasattr(prompt, "keys") else prompt).to(device)
            sampling = {"do_sample": True, "temperature": temperature} if temperature >= 1e-4 else {"do_sample": False}
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                **sampling,
            )
            replies.append(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip())
        return replies

    return generate


def vllm_generator(llm: Any, lora_request: Any = None, *, max_new_tokens: int = MAX_NEW_TOKENS, seed: int = 0):
    """Replies from a vLLM engine's ``chat``: the conversations of a turn in one batch, each with its own
    temperature (vLLM samples greedily at 0), the engine's tokenizer and chat template."""
    from vllm import SamplingParams

    def generate(conversations: list[list[dict[str, str]]], temperatures: list[float]) -> list[str]:
        params = [SamplingParams(temperature=t, max_tokens=max_new_tokens, seed=seed) for t in temperatures]
        outputs = llm.chat(conversations, params, use_tqdm=False, lora_request=lora_request)
        return [output.outputs[0].text.strip() for output in outputs]

    return generate


def answer_files(folder: Path) -> list[Path]:
    """The ``model_answer/*.jsonl`` files of an MT-Bench folder."""
    return sorted((folder / "model_answer").glob("*.jsonl"))


def write_answers(answers: list[dict[str, Any]], folder: str | Path) -> Path:
    """Write ``folder/model_answer/<model_id>.jsonl``, one JSON line per answer."""
    path = Path(folder) / "model_answer" / f"{answers[0]['model_id']}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(answer) + "\n" for answer in answers))
    return path


def read_answers(path: Path) -> tuple[str, dict[int, list[str]]]:
    """``(model_id, {question_id: turns})`` from a ``model_answer`` file (FastChat names the model by the file)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return path.stem, {row["question_id"]: row["choices"][0]["turns"] for row in rows}


def judge_folder(
    folder: Path,
    settings: JudgeSettings,
    questions: list[dict[str, Any]],
    *,
    baseline: Path | None = None,
) -> dict[str, Any]:
    """Judge the answers in ``folder/model_answer`` (one model), single-answer and, with ``baseline`` (another
    ``model_answer`` file), pairwise; rows already judged are kept. Writes ``results.md`` and ``categories.png``
    beside them and returns the scores for ``summary.json``.

    Raises:
        JudgeError: the judge's endpoint, model or key does not work (rows judged so far stay).
    """
    (answers_path,) = answer_files(folder)
    model, answers = read_answers(answers_path)
    client = connect(settings)
    files = judgment_files(folder, settings)
    categories = {q["question_id"]: q["category"] for q in questions}

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"judged {done}/{total}", flush=True)

    run_matches(make_matches(questions, model, answers), client, settings, files["single"], progress=progress)
    single = single_scores(read_rows(files["single"]), categories, model)
    pairwise = None
    if baseline is not None:
        opponent = read_answers(baseline)
        if opponent[0] == model:
            opponent = (f"{opponent[0]}-baseline", opponent[1])
        matches = make_matches(questions, model, answers, opponent)
        run_matches(matches, client, settings, files["pair"], progress=progress)
        pairwise = pairwise_rates(read_rows(files["pair"]), model, opponent[0])
    (folder / "results.md").write_text(results_markdown(settings.model, single, pairwise))
    if single["categories"]:
        plot_categories(single, folder / "categories.png")
    result = {
        "judge": settings.model,
        "judge_base_url": settings.base_url,
        "prompts": f"FastChat llm_judge judge_prompts.jsonl ({JUDGE_PACKAGE}), GPT-4 reference answers",
        "single": single,
    }
    return result | ({"pairwise": pairwise} if pairwise else {})
