"""Resumable worker runs and learning-rate sweeps, for the quality benchmarks and the study.

A run is a fresh process that gets its settings (a JSON spec) on the command line and writes ``<out>/runs/<key>.json``;
a run whose JSON exists with the same settings is not run again, one that failed is retried.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Spec keys that do not change a run's result: where it writes, how it was reached, its thread count.
IGNORED_KEYS = ("out", "reuse", "save_adapter", "threads")


def comparable(spec: dict) -> dict:
    """A spec without the keys that do not change the result (:data:`IGNORED_KEYS`)."""
    return {k: v for k, v in spec.items() if k not in IGNORED_KEYS}


def settings_diff(a: dict, b: dict) -> str:
    """The settings two specs differ in, as ``key: a vs b, ...``."""
    a, b = comparable(a), comparable(b)
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def worker_error(log_path: Path, returncode: int) -> str:
    """One line saying why a worker failed: the exception it raised, or the signal that ended it."""
    if returncode < 0:
        return f"ended by signal {-returncode}"
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
    return errors[-1] if errors else f"exit code {returncode}: {lines[-1] if lines else 'no output'}"


def run_stored(
    command: list[str],
    spec: dict,
    path: Path,
    log: Callable[[str], None],
    done: Callable[[dict], str],
    note: str = "",
) -> dict:
    """``command + [spec as JSON]`` in a fresh process that writes ``path``, or the result stored there.

    The worker's output goes to ``path`` with ``.log``; a failed run is recorded (``error``, ``log``) and retried
    next time. ``done(result)`` is the log line's tail for a run that succeeded.

    Raises:
        SystemExit: ``path`` holds a run of other settings.
    """
    key = path.stem
    if path.is_file():
        stored = json.loads(path.read_text())
        if comparable(stored["spec"]) != comparable(spec):
            raise SystemExit(
                f"{path} was run with other settings ({settings_diff(stored['spec'], spec)}); "
                "use another --out or delete it"
            )
        if "error" not in stored:
            return stored
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(path)}
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1)), "TOKENIZERS_PARALLELISM": "false"}
    log(f"run {key}{note} ...")
    began = time.time()
    log_path = path.with_suffix(".log")  # the worker's output, to follow a long run
    with log_path.open("w") as handle:
        finished = subprocess.run([*command, json.dumps(spec)], stdout=handle, stderr=subprocess.STDOUT, env=env)
    if finished.returncode != 0 or not path.is_file():
        result = {"spec": spec, "error": worker_error(log_path, finished.returncode), "log": str(log_path)}
        path.write_text(json.dumps(result, indent=1))
        log(f"  {key} FAILED after {time.time() - began:.0f} s: {result['error']} (see {log_path})")
        return result
    result = json.loads(path.read_text())
    log(f"  {key} {time.time() - began:.0f} s: {done(result)}")
    return result


def run_parallel(run: Callable[[dict], dict], specs: list[dict], jobs: int) -> list[dict]:
    """``run(spec)`` for every spec, ``jobs`` at a time; results in the order of ``specs``."""
    if jobs <= 1:
        return [run(spec) for spec in specs]
    # Threads only wait on worker subprocesses, so the GIL costs nothing here.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(run, specs))


def next_lr(lr: float, up: bool, mantissas: tuple[float, ...] = (1, 3)) -> float:
    """The next learning rate of the series ``mantissas`` x 10^e (default 1-3: ..., 1e-4, 3e-4, 1e-3, ...) above or
    below ``lr``."""
    series = [float(f"{m}e{e}") for e in range(-9, 2) for m in mantissas]
    return min(v for v in series if v > lr * 1.01) if up else max(v for v in series if v < lr / 1.01)


def sweep_lrs(
    methods: list[str],
    lrs: list[float] | dict[str, list[float]],
    extend_edges: int,
    run: Callable[[list[tuple[str, float]]], list[dict]],
    best: Callable[[dict[float, dict]], float | None],
    log: Callable[[str], None],
    mantissas: tuple[float, ...] = (1, 3),
) -> dict[str, dict[float, dict]]:
    """Every method x lr (``run`` gets the pairs not run yet, returns their results in order); a method whose
    ``best`` lr is at an edge of its grid gets the next lr beyond that edge (series ``mantissas`` x 10^e), up to
    ``extend_edges`` times, so its best is inside the range it was tried on. ``lrs`` is one grid for every method,
    or ``{method: grid}``. Returns ``{method: {lr: result}}``."""
    grids = {method: sorted(lrs[method] if isinstance(lrs, dict) else lrs) for method in methods}
    table: dict[str, dict[float, dict]] = {method: {} for method in methods}
    for extension in range(1 + extend_edges):
        todo = [(method, lr) for method, grid in grids.items() for lr in grid if lr not in table[method]]
        if not todo:
            break
        for (method, lr), result in zip(todo, run(todo), strict=True):
            table[method][lr] = result
        for method, grid in grids.items() if extension < extend_edges else ():
            chosen = best(table[method])
            if chosen is not None and len(grid) > 1 and chosen in (grid[0], grid[-1]):
                log(f"{method}: best lr {chosen:g} at an edge of {[f'{lr:g}' for lr in grid]}: extending")
                grid.insert(len(grid) if chosen == grid[-1] else 0, next_lr(chosen, chosen == grid[-1], mantissas))
    return table


def finite(value: float | None) -> bool:
    """A score that can be compared (not missing, not NaN or infinite)."""
    return value is not None and math.isfinite(value)
