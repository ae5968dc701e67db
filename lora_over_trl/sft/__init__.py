"""The SFT command: a YAML recipe in, a trained and collapsed adapter (and its scores) out.

python -m lora_over_trl.sft recipes/demo_cpu.yaml
accelerate launch -m lora_over_trl.sft recipes/llama2_mtbench.yaml
"""

from lora_over_trl.sft.command import RecipeError, RunArguments, main, make_parser, parse_recipe

__all__ = ["RecipeError", "RunArguments", "main", "make_parser", "parse_recipe"]
