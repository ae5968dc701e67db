"""Run benchmark arms in fresh processes, alternating their order each repeat (shared by the bench scripts)."""

from __future__ import annotations

import json
import subprocess
import sys


def run_alternating(script: str, arms: list[str], repeats: int, extra: list[str]) -> dict[str, list[dict]]:
    """``python script --worker ARM *extra`` per arm and repeat; each worker prints one JSON line last.

    A fresh process per measurement keeps peak memory and allocator state its own; alternating the order
    spreads slow drifts of the machine over all arms.
    """
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for repeat in range(repeats):
        for arm in arms if repeat % 2 == 0 else list(reversed(arms)):
            cmd = [sys.executable, script, "--worker", arm, *extra]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[arm].append(json.loads(out.strip().splitlines()[-1]))
    return results
