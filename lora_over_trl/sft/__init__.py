"""The SFT command: a YAML recipe in, a trained and collapsed adapter (and its scores) out.

    python -m lora_over_trl.sft recipes/demo_cpu.yaml
    accelerate launch -m lora_over_trl.sft recipes/llama2_mtbench.yaml

``recipe`` (keys, flags, parsing), ``checks`` (everything checked before loading), ``data``, ``trainer`` (model,
tokenizer, ``SFTTrainer``), ``run`` (the run, top to bottom), ``outputs`` (folders and ``summary.json``),
``report`` (scores and the end-of-run report).
"""

from lora_over_trl.sft.checks import RecipeError
from lora_over_trl.sft.recipe import RunArguments, make_parser, parse_recipe
from lora_over_trl.sft.run import main, train

__all__ = ["RecipeError", "RunArguments", "main", "make_parser", "parse_recipe", "train"]
