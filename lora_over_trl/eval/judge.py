"""MT-Bench answers judged by an LLM at any OpenAI-compatible chat endpoint, the way FastChat's ``llm_judge`` does.

Two of FastChat's modes (Zheng et al., 2023, "Judging LLM-as-a-Judge"):

- **single-answer grading**: each turn of each answer rated 1-10 (``single-v1``; math, reasoning and coding against
  GPT-4's reference answers with ``single-math-v1``; turn 2 with the ``-multi-turn`` prompts, which show the whole
  conversation);
- **pairwise** against a baseline's answers (``pair-v2``, ``pair-math-v1``), each pair judged in both orders: a
  win needs the same verdict both ways, anything else is a tie (FastChat's guard against position bias).

The prompts, questions and reference answers are FastChat's own (:mod:`lora_over_trl.eval.fastchat_data`), the
judge is asked at temperature 0. Judgments are appended one JSON line at a time to FastChat's ``model_judgment``
files (``<judge>_single.jsonl``, ``<judge>_pair.jsonl``), so an interrupted run keeps every finished row and a
rerun skips them. Requests run ``parallel`` at a time; the ``openai`` client retries connection errors, 429 and 5xx
with exponential backoff. A reply without a parsable verdict is recorded with score -1 (winner ``"error"``), as
FastChat records it, and counted, never scored.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_over_trl.eval.fastchat_data import fastchat_setting, judge_prompts, reference_answers
from lora_over_trl.utils.errors import one_line

__all__ = [
    "JudgeError",
    "JudgeSettings",
    "Match",
    "connect",
    "judgment_files",
    "make_matches",
    "parse_rating",
    "parse_winner",
    "run_matches",
]

# FastChat's rating patterns (common.py): "[[8]]", else "[8]"
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


class JudgeError(RuntimeError):
    """A judge setting that does not work (endpoint, model, key); the message names the setting."""


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge is and how hard to push it. The API key is read from the environment, never a file."""

    model: str
    base_url: str | None = None  # None: OpenAI's own endpoint
    api_key_env: str = "OPENAI_API_KEY"
    parallel: int = 8
    max_tokens: int = 2048  # FastChat's judge budget
    max_retries: int = 6
    timeout: float = 600.0
    # Decode under a regex ending in the verdict (vLLM's and SGLang's structured outputs; OpenAI's API refuses it):
    # for a small local judge that otherwise rarely writes one. It changes what the judge may say, so its scores
    # compare only with scores judged the same way.
    structured: bool = False

    @property
    def slug(self) -> str:
        """The judge's name in file names, as FastChat writes it (``org/model`` -> ``org--model``)."""
        return self.model.strip("/").replace("/", "--")


@dataclass(frozen=True)
class Match:
    """One judgment to make: a question's turn, the model's answer and, for pairwise, the baseline's."""

    question: dict[str, Any]
    turn: int
    model: str
    answer: list[str]
    baseline: str | None = None
    baseline_answer: list[str] | None = None

    @property
    def key(self) -> tuple:
        """What a judgment row is recorded under (FastChat's cache key, plus the opponent for pairwise)."""
        qid = self.question["question_id"]
        return (qid, self.turn, self.model) if self.baseline is None else (qid, self.turn, self.model, self.baseline)


def judgment_files(folder: Path, settings: JudgeSettings) -> dict[str, Path]:
    """FastChat's ``model_judgment`` files for this judge under ``folder``: ``single`` and ``pair``."""
    base = folder / "model_judgment"
    return {"single": base / f"{settings.slug}_single.jsonl", "pair": base / f"{settings.slug}_pair.jsonl"}


def connect(settings: JudgeSettings) -> Any:
    """An ``openai`` client for the judge, after checking that the endpoint answers, takes the key and serves the
    model (``GET /models``; an endpoint without that route is trusted until its first reply).

    Raises:
        JudgeError: the key is missing or refused, nothing answers at the URL, or the model is not served there.
    """
    from openai import APIConnectionError, APIStatusError, AuthenticationError, OpenAI

    where = settings.base_url or "OpenAI's API"
    key = os.environ.get(settings.api_key_env)
    if not key:
        if settings.base_url is None:
            raise JudgeError(
                f"--judge_api_key_env: ${settings.api_key_env} is not set; the judge's API key is read from it"
            )
        key = "EMPTY"  # a local server (vllm serve without --api-key, SGLang, TGI) takes any key
    client = OpenAI(base_url=settings.base_url, api_key=key, max_retries=settings.max_retries, timeout=settings.timeout)
    try:
        served = [model.id for model in client.with_options(max_retries=1, timeout=30).models.list()]
    except AuthenticationError as err:
        raise JudgeError(
            f"--judge_api_key_env: {where} refused the key in ${settings.api_key_env} ({err.status_code})"
        ) from err
    except APIConnectionError as err:
        raise JudgeError(f"--judge_base_url {where}: no endpoint answers there ({one_line(err)})") from err
    except APIStatusError as err:
        if err.status_code == 404:
            return client
        raise JudgeError(f"--judge_base_url {where}: GET /models answered {err.status_code}") from err
    if settings.model not in served:
        raise JudgeError(f"--judge_model {settings.model}: not served at {where} (it serves {', '.join(served[:6])})")
    return client


def make_matches(
    questions: list[dict[str, Any]],
    model: str,
    answers: dict[int, list[str]],
    baseline: tuple[str, dict[int, list[str]]] | None = None,
) -> list[Match]:
    """Every turn of every question the model answered (and, for pairwise, the baseline too), in question order."""
    matches = []
    for question in questions:
        qid = question["question_id"]
        if qid not in answers or (baseline is not None and qid not in baseline[1]):
            continue
        for turn in range(1, len(question["turns"]) + 1):
            if baseline is None:
                matches.append(Match(question, turn, model, answers[qid]))
            else:
                matches.append(Match(question, turn, model, answers[qid], baseline[0], baseline[1][qid]))
    return matches


def parse_rating(judgment: str) -> float:
    """The 1-10 rating in a single-answer judgment (``[[8]]``, else ``[8]``), or -1 when there is none."""
    found = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    return float(found.group(1)) if found else -1.0


def parse_winner(judgment: str) -> str:
    """``"A"``, ``"B"``, ``"tie"`` (``[[C]]``) or ``"error"`` from a pairwise judgment, checked in FastChat's order."""
    for mark, winner in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if mark in judgment:
            return winner
    return "error"


class _Prompts:
    """FastChat's prompts and references, and the rule that picks one for a match."""

    def __init__(self) -> None:
        self.prompts = judge_prompts()
        self.references = reference_answers()
        self.need_reference = set(fastchat_setting("common.py", "NEED_REF_CATS"))

    def name(self, match: Match) -> str:
        reference = match.question["category"] in self.need_reference
        if match.baseline is None:
            name = "single-math-v1" if reference else "single-v1"
        else:
            name = "pair-math-v1" if reference else "pair-v2"
        return name + ("-multi-turn" if match.turn == 2 else "")

    def messages(self, match: Match, answer_a: list[str], answer_b: list[str] | None = None) -> list[dict[str, str]]:
        """The judge's chat: FastChat's system prompt, then its template filled as ``common.py`` fills it."""
        prompt = self.prompts[self.name(match)]
        question = match.question["turns"]
        fields: dict[str, str] = {}
        if match.question["category"] in self.need_reference:
            reference = self.references[match.question["question_id"]]
            fields["ref_answer_1"] = reference[0]
            if match.turn == 2:
                fields["ref_answer_2"] = reference[1]
        if match.turn == 2:
            fields.update(question_1=question[0], question_2=question[1])
            if answer_b is None:
                fields.update(answer_1=answer_a[0], answer_2=answer_a[1])
            else:
                fields.update(answer_a_1=answer_a[0], answer_a_2=answer_a[1])
                fields.update(answer_b_1=answer_b[0], answer_b_2=answer_b[1])
        else:
            fields["question"] = question[0]
            if answer_b is None:
                fields["answer"] = answer_a[0]
            else:
                fields.update(answer_a=answer_a[0], answer_b=answer_b[0])
        user = prompt["prompt_template"].format(**fields)
        return [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]


def verdict_regex(settings: JudgeSettings, pairwise: bool) -> str:
    """The structured-output pattern: an explanation without brackets that fits the reply's token budget (counted at
    2 characters a token: a small judge's repetitive text runs below 3), then FastChat's verdict (``Rating:
    [[1-10]]``, or ``[[A]]``/``[[B]]``/``[[C]]``)."""
    room = max(0, 2 * (settings.max_tokens - 16))
    verdict = r"\[\[(A|B|C)\]\]" if pairwise else r"Rating: \[\[(10|[1-9])\]\]"
    return rf"[^\[\]]{{0,{room}}}{verdict}"


def _ask(
    client: Any, settings: JudgeSettings, messages: list[dict[str, str]], pairwise: bool
) -> tuple[str, str | None]:
    """The judge's reply, or ``("", why)`` for a request the endpoint refuses as such (400: e.g. longer than its
    context). Failures of the setting itself (model, key, connection after the retries) raise JudgeError."""
    from openai import APIConnectionError, AuthenticationError, BadRequestError, NotFoundError

    extra = {"structured_outputs": {"regex": verdict_regex(settings, pairwise)}} if settings.structured else None
    try:
        reply = client.chat.completions.create(
            model=settings.model,
            messages=messages,
            temperature=0.0,
            max_tokens=settings.max_tokens,
            extra_body=extra,
        )
    except NotFoundError as err:
        raise JudgeError(f"--judge_model {settings.model}: the endpoint has no such model ({one_line(err)})") from err
    except AuthenticationError as err:
        raise JudgeError(f"--judge_api_key_env: the endpoint refused the key in ${settings.api_key_env}") from err
    except APIConnectionError as err:
        where = settings.base_url or "OpenAI's API"
        raise JudgeError(f"--judge_base_url {where}: the endpoint stopped answering ({one_line(err)})") from err
    except BadRequestError as err:
        return "", one_line(err)
    return reply.choices[0].message.content or "", None


def _judge_single(client: Any, settings: JudgeSettings, prompts: _Prompts, match: Match) -> dict[str, Any]:
    messages = prompts.messages(match, match.answer)
    judgment, error = _ask(client, settings, messages, pairwise=False)
    row = {
        "question_id": match.question["question_id"],
        "model": match.model,
        "judge": [settings.model, prompts.name(match)],
        "user_prompt": messages[1]["content"],
        "judgment": judgment,
        "score": parse_rating(judgment),
        "turn": match.turn,
        "tstamp": time.time(),
    }
    return row | ({"error": error} if error else {})


def _judge_pair(client: Any, settings: JudgeSettings, prompts: _Prompts, match: Match) -> dict[str, Any]:
    """Both orders: game 1 shows the model as A, game 2 the baseline as A (verdicts mapped back to model_1/2)."""
    row: dict[str, Any] = {
        "question_id": match.question["question_id"],
        "model_1": match.model,
        "model_2": match.baseline,
        "judge": [settings.model, prompts.name(match)],
    }
    errors = []
    for game, (first, second), names in (
        ("g1", (match.answer, match.baseline_answer), {"A": "model_1", "B": "model_2"}),
        ("g2", (match.baseline_answer, match.answer), {"A": "model_2", "B": "model_1"}),
    ):
        messages = prompts.messages(match, first, second)
        judgment, error = _ask(client, settings, messages, pairwise=True)
        errors += [error] if error else []
        verdict = parse_winner(judgment)
        row |= {f"{game}_winner": names.get(verdict, verdict), f"{game}_user_prompt": messages[1]["content"]}
        row[f"{game}_judgment"] = judgment
    return row | {"turn": match.turn, "tstamp": time.time()} | ({"error": "; ".join(errors)} if errors else {})


def recorded_keys(path: Path, pairwise: bool) -> set[tuple]:
    """Keys of the rows already in a judgment file (any verdict, parsable or not: a rerun does not ask again)."""
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if pairwise:
            keys.add((row["question_id"], row["turn"], row["model_1"], row["model_2"]))
        else:
            keys.add((row["question_id"], row["turn"], row["model"]))
    return keys


def run_matches(
    matches: Iterable[Match],
    client: Any,
    settings: JudgeSettings,
    path: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Judge the matches not yet recorded in ``path``, ``settings.parallel`` at a time, appending each row as it
    completes; returns how many were judged now. On a JudgeError the rows written so far stay, the rest are
    cancelled, and the error is raised."""
    matches = list(matches)
    if not matches:
        return 0
    recorded = recorded_keys(path, pairwise=matches[0].baseline is not None)
    pending = [match for match in matches if match.key not in recorded]
    if not pending:
        return 0
    prompts = _Prompts()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    done = 0

    def judge_one(match: Match) -> None:
        nonlocal done
        judge = _judge_single if match.baseline is None else _judge_pair
        row = judge(client, settings, prompts, match)
        with lock, path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            done += 1
            if progress is not None:
                progress(done, len(pending))

    with ThreadPoolExecutor(max_workers=settings.parallel) as pool:
        futures = [pool.submit(judge_one, match) for match in pending]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in finished if f.exception() is not None]
        if failed:
            for future in futures:
                future.cancel()
            raise failed[0].exception()
    return done
