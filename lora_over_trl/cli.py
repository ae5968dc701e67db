"""``lora-over-trl sft|eval|analyze ...``: the console entry point, one command per module.

    lora-over-trl sft recipes/demo_cpu.yaml          # = python -m lora_over_trl.sft recipes/demo_cpu.yaml
    lora-over-trl eval runs/demo_cpu --tasks gsm8k   # = python -m lora_over_trl.eval ...
    lora-over-trl analyze spectrum runs/demo_cpu     # = python -m lora_over_trl.analyze ...
    lora-over-trl eval --tasks_dir                   # the shipped lm-eval task wrappers' folder

Multi-process runs keep accelerate's launcher: ``accelerate launch -m lora_over_trl.sft RECIPE``.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import version

COMMANDS = {
    "sft": ("lora_over_trl.sft", "train with a recipe (TRL SFTTrainer + LoRA-Over or another method), collapse"),
    "eval": ("lora_over_trl.eval", "score an adapter or merged model with lm-evaluation-harness"),
    "analyze": ("lora_over_trl.analyze", "spectrum of the updates, loss landscape around the adapter"),
}


def usage() -> str:
    lines = ["usage: lora-over-trl {sft,eval,analyze} ...  (lora-over-trl COMMAND --help for its options)", ""]
    lines += [f"  {name:<9}{summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``COMMAND`` with the rest of ``argv``; returns its exit code (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"lora-over-trl {version('lora-over-trl')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
