"""Where the GSM8K documents come from: a local copy when one is named, the hub dataset otherwise.

A local copy is a folder with ``train.jsonl`` and ``test.jsonl`` (``question``/``answer`` per line, as in
openai/grade-school-math). Name it with ``--metadata '{"gsm8k_dir": "DIR"}'`` or ``LORA_OVER_GSM8K_DIR=DIR``.
With neither, and ``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1``, loading stops with an error instead of
trying the network. Self-contained: usable with plain lm-eval, without lora_over_trl installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

ENV_VAR = "LORA_OVER_GSM8K_DIR"


def load_gsm8k(gsm8k_dir: str | None = None, **_ignored) -> datasets.DatasetDict:
    folder = gsm8k_dir or os.environ.get(ENV_VAR)
    if folder:
        files = {split: Path(folder) / f"{split}.jsonl" for split in ("train", "test")}
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"GSM8K folder {folder} lacks {missing}: it needs train.jsonl and test.jsonl")
        return datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})
    if "1" in (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE")):
        raise RuntimeError(
            f'GSM8K: offline and no local copy; set {ENV_VAR}=DIR or --metadata \'{{"gsm8k_dir": "DIR"}}\''
        )
    return datasets.load_dataset("openai/gsm8k", "main")
