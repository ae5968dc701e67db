"""The ``--quick`` modes' model: the test suite's tiny Llama and its in-process tokenizer, saved as one folder.

The benchmarks reuse ``tests/conftest.py`` rather than a copy of it, so the smoke tests exercise the same
model the unit tests do.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def save_tiny_llama(folder: str | Path, *, hidden_size: int = 128, max_positions: int = 512) -> str:
    """A randomly initialized two-layer Llama (vocab 1000) and a BPE tokenizer trained on GSM8K, in ``folder``
    (built once; a folder that already holds both is reused)."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return str(folder)
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import conftest

    folder.mkdir(parents=True, exist_ok=True)
    conftest.save_tiny_llama(folder, hidden_size=hidden_size, max_positions=max_positions)
    conftest.train_tokenizer().save_pretrained(folder)
    return str(folder)
