"""Per-module mutation scores from mutmut's results: the table `docs/testing.md` records.

    mutmut results --all true | python scripts/mutation_scores.py

A mutant counts as killed when a test failed or timed out on it; "no tests" (no selected test reached the
mutated function) and "suspicious" count against the score, as survivors do. Mutants not checked yet (an
interrupted run) are counted apart and left out of the score. Survivors are listed after the table, for
`mutmut show NAME`.
"""

from __future__ import annotations

import collections
import re
import sys

KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def module_of(mutant: str) -> str:
    """``lora_over_trl.lora_over.mpo.x_contract__mutmut_3`` and
    ``lora_over_trl.lora_over.bank.xǁFactorBankǁrepack__mutmut_7``: the module is everything before the mangled
    function name."""
    return re.split(r"\.x[_ǁ]", mutant, maxsplit=1)[0]


def main() -> None:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors: list[tuple[str, str]] = []
    for line in sys.stdin:
        name, sep, status = line.strip().rpartition(": ")
        if not sep:
            continue
        counts[module_of(name)][status] += 1
        if status not in KILLED and status not in ("skipped", "not checked"):
            survivors.append((name, status))
    print("| module | mutants | not checked | killed | survived | no tests | score |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for module, c in sorted(counts.items()):
        checked = sum(n for s, n in c.items() if s not in ("skipped", "not checked"))
        killed = sum(c[s] for s in KILLED)
        score = f"{killed / checked:.1%}" if checked else "-"
        row = [sum(c.values()) - c["skipped"], c["not checked"], killed, c["survived"], c["no tests"]]
        print(f"| `{module}` | " + " | ".join(map(str, row)) + f" | {score} |")
    for name, status in survivors:
        print(f"{status}: {name}")


if __name__ == "__main__":
    main()
