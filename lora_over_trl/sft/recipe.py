"""The SFT command's recipe: a YAML file of TRL's own keys plus :class:`RunArguments`, with ``--key value`` flags.

Recipe keys are TRL's (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``, ``DatasetMixtureConfig``:
``model_name_or_path``, ``load_in_4bit``, ``lora_r``, ``dataset_name``/``datasets``, ``learning_rate`` ...) plus
``method``, its settings section (``lora_over:``, ``cla:``, ``glora:``: :mod:`lora_over_trl.registry`), column
mapping, merge and evaluation. ``--SECTION.KEY value`` sets one setting of a section. Unknown keys, bad values
and what the launch mode cannot run are all reported at once, as one :class:`RecipeError`, before anything loads.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from lora_over_trl.registry import METHODS, Method, sections
from lora_over_trl.sft.checks import RecipeError, argument_problems, name_the_field
from lora_over_trl.utils.errors import one_line

__all__ = ["RecipeError", "RunArguments", "make_parser", "parse_recipe"]


@dataclass
class _CommandArguments:
    """The recipe keys this command adds to TRL's, but the methods' sections."""

    method: str = field(
        default="lora_over",
        metadata={"help": "the method: " + "; ".join(f"`{name}`: {method.help}" for name, method in METHODS.items())},
    )
    dataset_columns: dict | str | None = field(
        default=None,
        metadata={"help": "build messages/prompt/completion/text from columns: a column name or a {column} template"},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start afresh in an output_dir that holds another run (its outputs go)"}
    )
    merge: bool = field(default=False, metadata={"help": "also write output_dir/merged/ (float32, adapter merged)"})
    eval_tasks: str | None = field(
        default=None, metadata={"help": "score adapter/ afterwards with lora_over_trl.eval, e.g. `gsm8k`"}
    )
    eval_base: bool = field(default=False, metadata={"help": "also score the base model, for comparison"})
    eval_args: str = field(
        default="", metadata={"help": "more flags for lora_over_trl.eval, e.g. `--limit 50 --num_fewshot 0`"}
    )


def _section_field(method: Method) -> tuple[str, Any, Any]:
    config_class = method.config.rpartition(":")[2]
    help = f"{method.label} settings ({config_class} fields), a mapping; `--{method.section}.KEY value` sets one"
    return method.section, dict | str | None, field(default=None, metadata={"help": help})


# One section per method that has settings (lora_over:, cla:, glora:), as the registry names them.
RunArguments = make_dataclass(
    "RunArguments",
    [_section_field(next(m for m in METHODS.values() if m.section == name)) for name in sections()],
    bases=(_CommandArguments,),
    namespace={"__doc__": "The recipe keys this command adds to TRL's: method, its section, data, merge, evaluation."},
)
RunArguments.__module__ = __name__


def make_parser():
    """TrlParser over TRL's dataclasses and :class:`RunArguments` (imports here keep ``--help`` fast)."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, RunArguments))


def parse_recipe(argv: list[str]) -> tuple[Any, ...]:
    """``(script_args, training_args, model_args, dataset_args, run_args, method_config)`` or a RecipeError.

    ``method_config`` is a :class:`LoraOverConfig`, a :class:`ClaConfig`, or ``None`` (plain LoRA).
    """
    import yaml

    if not argv or argv[0].startswith("-"):
        raise RecipeError("usage: python -m lora_over_trl.sft RECIPE.yaml [--key value ...]")
    recipe_path, flags = Path(argv[0]), list(argv[1:])
    if not recipe_path.is_file():
        raise RecipeError(f"recipe {recipe_path} does not exist")
    try:
        recipe = yaml.safe_load(recipe_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {recipe_path} is not valid YAML: {one_line(err)}") from err
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe {recipe_path} must be a mapping of keys to values")
    for key, value in (recipe.pop("env", None) or {}).items():
        os.environ[str(key)] = str(value)

    parser = make_parser()
    known = {action.dest for action in parser._actions} - {"help"}
    unknown = [key for key in recipe if key not in known]
    if unknown:
        raise RecipeError(f"recipe {recipe_path}: unknown key {_did_you_mean(unknown[0], known)}")
    section_flags, flags = _split_section_flags(flags)
    parser.set_defaults_with_config(**recipe)
    try:
        script_args, training_args, model_args, dataset_args, run_args, rest = parser.parse_args_into_dataclasses(
            args=flags, return_remaining_strings=True
        )
    except ValueError as err:  # dataclass __post_init__ checks (TRL, transformers)
        raise RecipeError(name_the_field(one_line(err))) from err
    if rest:
        flag = rest[0].lstrip("-").split("=")[0]
        raise RecipeError(f"unknown flag {_did_you_mean(flag, known, prefix='--')}")
    problems = argument_problems(training_args, model_args)
    try:
        method_config = _method_config(run_args, section_flags)
    except RecipeError as err:
        problems.append(str(err))
    else:
        from lora_over_trl.registry import refusal
        from lora_over_trl.utils.distributed import launch_mode

        refused = refusal(run_args.method, method_config, launch_mode(training_args))
        if refused:
            problems.append(refused)
    if problems:
        count = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise RecipeError(count + "; ".join(problems))
    return script_args, training_args, model_args, dataset_args, run_args, method_config


def _split_section_flags(flags: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``--SECTION.KEY VALUE`` (or ``=VALUE``) flags by section, values read as YAML; the other flags."""
    import yaml

    names = sections()
    given: dict[str, dict[str, Any]] = {name: {} for name in names}
    rest, i = [], 0
    while i < len(flags):
        flag = flags[i]
        section = next((name for name in names if flag.startswith(f"--{name}.")), None)
        if section is None:
            rest.append(flag)
        else:
            key, has_value, value = flag[len(section) + 3 :].partition("=")
            if not has_value:
                if i + 1 >= len(flags):
                    raise RecipeError(f"{flag} needs a value")
                i, value = i + 1, flags[i + 1]
            given[section][key] = yaml.safe_load(value)
        i += 1
    return given, rest


def _method_config(run_args: Any, overrides: dict[str, dict[str, Any]]):
    """The method's config from its recipe section and ``--SECTION.KEY`` flags (``None`` for plain LoRA)."""
    from lora_over_trl.registry import build_config, get_method

    try:
        method = get_method(run_args.method)
    except ValueError as err:
        raise RecipeError(str(err)) from err
    given = {}
    for name in sections():
        section = getattr(run_args, name)
        if isinstance(section, str):
            section = json.loads(section) if section.strip() else {}
        section = {**(section or {}), **overrides[name]}
        if not isinstance(section, dict):
            raise RecipeError(f"{name}: expected a mapping of settings, got {section!r}")
        if section and name != method.section:
            raise RecipeError(f"{name}: settings given but method is {method.name!r}; remove them or change the method")
        given[name] = section
    try:
        return build_config(method.name, given.get(method.section))
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{method.section}: {one_line(err)}") from err


def _did_you_mean(name: str, known: set[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"`{prefix}{name}`" + (f" (did you mean `{prefix}{close[0]}`?)" if close else "")
