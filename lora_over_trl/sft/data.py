"""The SFT command's datasets: load a hub name or local files, map columns, check the format TRL expects.

TRL's ``SFTTrainer`` trains on one of three layouts: conversational ``messages`` (a list of
``{"role", "content"}``), ``prompt`` + ``completion`` (loss on the completion only), or plain ``text``.
``dataset_columns`` turns common instruction formats into one of them, each target a column name or a
template over columns::

    dataset_columns: {prompt: "Question: {question}\\nAnswer:", completion: " {answer}"}   # GSM8K
    dataset_columns: {prompt: "{instruction}\\n\\n{input}", completion: output}           # Alpaca
    dataset_columns: {messages: conversations}          # ShareGPT (from/value, human/gpt become role/content)
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from lora_over_trl.utils.errors import first_line

__all__ = [
    "LOCAL_BUILDERS",
    "TARGETS",
    "DataError",
    "check_format",
    "load_local_or_hub",
    "load_train_eval_data",
    "map_columns",
]

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
TARGETS = ("messages", "prompt", "completion", "text")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant"}


class DataError(ValueError):
    """A dataset problem the user can fix (missing file, missing column, unknown layout)."""


def load_local_or_hub(name: str, config: str | None = None, split: str = "train") -> Any:
    """One split of a hub dataset (``name``, ``config``), a local data file, or a local dataset folder.

    A local file is read as the split the recipe names, so a hub recipe's ``dataset_train_split`` (a name and
    an optional slice such as ``train_sft[:20000]``) also works on a local copy of that split.
    """
    from datasets import load_dataset

    path = Path(name)
    try:
        if path.is_file():
            builder = LOCAL_BUILDERS.get(path.suffix)
            if builder is None:
                raise DataError(f"dataset_name: {name} is not one of {sorted(LOCAL_BUILDERS)}")
            if path.stat().st_size == 0:
                raise DataError(f"dataset_name: {name} is empty; give a file with at least one row")
            # a local file holds one split, named as the recipe's (`train_sft[:20000]` reads it as `train_sft`)
            dataset = load_dataset(builder, data_files={split.split("[")[0]: str(path)}, split=split)
        else:
            if not path.exists() and (name.startswith((".", "/")) or path.suffix in LOCAL_BUILDERS):
                raise DataError(f"dataset_name: no such file or folder: {name}")
            dataset = load_dataset(name, name=config, split=split)
    except DataError:
        raise
    except Exception as err:  # hub/offline/format errors from `datasets`: report them in one line
        if "corresponds to no data" in str(err):  # datasets' words for a file of blank lines
            raise DataError(f"dataset_name: {name!r} (split {split!r}) has no rows") from err
        raise DataError(f"dataset_name: cannot load {name!r} (split {split!r}): {first_line(err)}") from err
    if len(dataset) == 0:
        raise DataError(f"dataset_name: {name!r} (split {split!r}) has no rows")
    return dataset


def map_columns(dataset: Any, mapping: dict[str, str]) -> Any:
    """Build TRL's columns from ``mapping`` (target -> column name or ``{column}`` template)."""
    unknown = sorted(set(mapping) - set(TARGETS))
    if unknown:
        raise DataError(f"dataset_columns: unknown target(s) {unknown}; allowed: {list(TARGETS)}")
    columns = set(dataset.column_names)
    sources: dict[str, tuple[str, list[str]]] = {}
    for target, spec in mapping.items():
        if not isinstance(spec, str):
            raise DataError(f"dataset_columns.{target}: expected a column name or a template string, got {spec!r}")
        fields = [f for _, f, _, _ in string.Formatter().parse(spec) if f]
        needed = fields or [spec]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(
                f"dataset_columns.{target}: column(s) {missing} not in the dataset; it has {sorted(columns)}"
            )
        if target == "messages" and fields:
            raise DataError("dataset_columns.messages: name a column holding a list of turns, not a template")
        sources[target] = (spec, fields)

    def build(row: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for target, (spec, fields) in sources.items():
            if target == "messages":
                out[target] = _as_messages(row[spec])
            elif fields:
                out[target] = spec.format(**{f: "" if row[f] is None else row[f] for f in fields})
            else:
                out[target] = row[spec]
        return out

    return dataset.map(build, remove_columns=sorted(columns), desc="Mapping dataset columns")


def check_format(dataset: Any, text_field: str = "text") -> str:
    """The layout TRL will train on (``messages``, ``prompt-completion`` or ``text``), or a DataError."""
    columns = set(dataset.column_names)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt-completion"
    if text_field in columns:
        return "text"
    raise DataError(
        f"the dataset has columns {sorted(columns)} but SFT needs `messages`, `prompt` + `completion`, or "
        f"`{text_field}` (dataset_text_field); map yours with dataset_columns, e.g. "
        '{prompt: "{question}", completion: answer}'
    )


def _as_messages(turns: Any) -> list[dict[str, str]]:
    """Turns as role/content dicts; ShareGPT's ``from``/``value`` (human, gpt) are translated."""
    messages = []
    for turn in turns:
        if "role" in turn:
            messages.append({"role": turn["role"], "content": turn["content"]})
        else:
            speaker = str(turn["from"]).lower()
            messages.append({"role": _SHAREGPT_ROLES.get(speaker, speaker), "content": turn["value"]})
    return messages


def load_train_eval_data(script_args: Any, training_args: Any, dataset_args: Any, run_args: Any):
    """``(train, eval or None)`` with TRL's columns, or a RecipeError naming the field."""
    from lora_over_trl.sft.checks import RecipeError

    try:
        if dataset_args.datasets:
            train, test = _mixture(dataset_args)
        elif script_args.dataset_name:
            train = load_local_or_hub(
                script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split
            )
            test = None
            if training_args.eval_strategy != "no":
                test = load_local_or_hub(
                    script_args.dataset_name, script_args.dataset_config, script_args.dataset_test_split
                )
        else:
            raise DataError("dataset_name or datasets: the recipe names no training data")
        if training_args.eval_strategy == "no":
            test = None
        elif test is None:
            raise DataError(f"eval_strategy={training_args.eval_strategy}: no evaluation split (test_split_size?)")
        mapping = run_args.dataset_columns
        if isinstance(mapping, str):
            mapping = json.loads(mapping)
        parts = []
        for part in (train, test):
            if part is not None and mapping:
                part = map_columns(part, mapping)
            if part is not None:
                check_format(part, training_args.dataset_text_field)
            parts.append(part)
        return parts[0], parts[1]
    except DataError as err:
        raise RecipeError(str(err)) from err


def _mixture(dataset_args: Any):
    from trl import get_dataset

    for spec in dataset_args.datasets:
        files = spec.data_files
        for name in [files] if isinstance(files, str) else list(files or []):
            if isinstance(name, str) and not any(ch in name for ch in "*?[") and not Path(name).exists():
                raise DataError(f"datasets: data_files {name} does not exist")
    try:
        dataset = get_dataset(dataset_args)
    except Exception as err:
        raise DataError(f"datasets: cannot load the mixture: {first_line(err)}") from err
    return dataset["train"], dataset["test"] if "test" in dataset else None
