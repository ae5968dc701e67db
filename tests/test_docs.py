"""The user documentation names only what exists: files, commands and their flags, recipe keys.

README.md, docs/*.md and BENCHMARKS.md are read as text: every relative link and every backticked repository path
must exist; every `python -m lora_over_trl.X` (or `accelerate launch -m ...`) and `lora-over-trl X` command must be
a real command with real flags; every recipe shown in a YAML block must use keys the SFT command accepts. (The
shipped recipes themselves are run by tests/test_recipes.py.)
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]

# Backticked tokens that start with one of these folders are repository paths.
REPO_DIRS = ("recipes/", "docs/", "benches/", "examples/", "scripts/", "tests/", "lora_over_trl/", "evals/")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
COMMAND = re.compile(r"(?:-m lora_over_trl\.|lora-over-trl )([a-z_]+)([^\n;|)#`]*)")
SECTIONS = {"lora_over", "cla", "glora", "env"}


def _strip_fences(text: str) -> str:
    return FENCE.sub("", text)


def _path_candidates(text: str) -> list[str]:
    """Relative link targets, and backticked tokens (outside code blocks) that look like repository paths."""
    found = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # http:, https:, mailto:, an anchor in the same page
        found.append(target.split("#")[0])
    for span in CODE_SPAN.findall(_strip_fences(text)):
        for token in span.split():
            token = token.strip("\"'(),;:").split("::")[0]
            if not token.startswith(REPO_DIRS) or any(c in token for c in "*{}$<>[]"):
                continue  # not a path, or a pattern / placeholder (`recipes/*.yaml`, `OUTPUT_DIR/eval-<time>/`)
            if re.search(r"[A-Z]{3,}", token):
                continue  # RECIPE.yaml, DIR: placeholders
            found.append(token)
    return found


def missing_paths(markdown: str, root: Path, base: Path | None = None) -> list[str]:
    """The paths a markdown text names that do not exist (links relative to ``base``, code paths to ``root``)."""
    base = base or root
    missing = []
    link_targets = {t.split("#")[0] for t in LINK.findall(markdown)}
    for path in _path_candidates(markdown):
        where = base if path in link_targets else root
        if not (where / path).exists() and not (root / path).exists():
            missing.append(path)
    return missing


def test_missing_paths_finds_a_bad_link_and_a_bad_code_path(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ok.md").write_text("")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.yaml").write_text("")
    text = (
        "[fine](docs/ok.md#part) [gone](docs/nope.md) [web](https://x.org/y) [anchor](#top)\n"
        "run `python -m lora_over_trl.sft recipes/a.yaml` or `recipes/b.yaml`; outputs in `runs/demo/adapter/`,\n"
        "placeholders `recipes/*.yaml` and `OUTPUT_DIR/eval-<time>/`\n"
        "```bash\npython -m lora_over_trl.sft recipes/in_a_block_only.yaml\n```\n"
    )
    assert missing_paths(text, tmp_path) == ["docs/nope.md", "recipes/b.yaml"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_path_exists(doc):
    assert missing_paths(doc.read_text(), ROOT, base=doc.parent) == []


TEST_NAME = re.compile(r"\b(test_\w+\.py)::(test_\w+)")


def missing_tests(markdown: str, tests: Path) -> list[str]:
    """The ``test_file.py::test_name`` references of a markdown text with no such test function in ``tests``."""
    missing = []
    for file, name in TEST_NAME.findall(markdown):
        path = tests / file
        if not path.is_file() or not re.search(rf"^def {name}\(", path.read_text(), re.MULTILINE):
            missing.append(f"{file}::{name}")
    return missing


def test_missing_tests_finds_a_renamed_test(tmp_path):
    (tmp_path / "test_a.py").write_text("def test_kept(x):\n    pass\n")
    text = "`test_a.py::test_kept`, `test_a.py::test_renamed`, `test_b.py::test_kept`"
    assert missing_tests(text, tmp_path) == ["test_a.py::test_renamed", "test_b.py::test_kept"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_test_exists(doc):
    assert missing_tests(doc.read_text(), ROOT / "tests") == []


# ---- commands -------------------------------------------------------------------------------------------


def _commands(text: str) -> list[tuple[str, list[str]]]:
    """``(command, flags)`` for every `python -m lora_over_trl.X ...` / `lora-over-trl X ...` in the text."""
    text = re.sub(r"\\\n\s*", " ", text)  # shell continuation lines
    found = []
    for name, rest in COMMAND.findall(text):
        words = rest.replace("[", " ").replace("]", " ").replace("`", " ").split()
        found.append((name, [w.split("=")[0] for w in words if w.startswith("--")]))
    return found


def _known_flags() -> dict[str, set[str]]:
    from lora_over_trl.analyze.command import make_parser as analyze_parser
    from lora_over_trl.eval.command import make_parser as eval_parser
    from lora_over_trl.sft import make_parser as sft_parser

    def options(parser) -> set[str]:
        flags = {s for action in parser._actions for s in action.option_strings}
        for action in parser._actions:  # analyze's subcommands
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):
                flags |= set().union(*(options(sub) for sub in choices.values()))
        return flags

    return {"sft": options(sft_parser()), "eval": options(eval_parser()), "analyze": options(analyze_parser())}


def test_every_command_and_flag_named_is_real():
    known = _known_flags()
    problems = []
    for doc in DOCS:
        for name, flags in _commands(doc.read_text()):
            if name not in known:
                problems.append(f"{doc.name}: no command {name!r}")
                continue
            for flag in flags:
                section = flag[2:].split(".")[0]
                if flag not in known[name] and not (name == "sft" and "." in flag and section in SECTIONS):
                    problems.append(f"{doc.name}: {name} has no flag {flag}")
    assert problems == []


def test_commands_are_found_with_their_flags():
    text = 'x `python -m lora_over_trl.eval RUN --limit 5 [--load_in_4bit]` y "$(lora-over-trl eval --tasks_dir)" z'
    assert _commands(text) == [("eval", ["--limit", "--load_in_4bit"]), ("eval", ["--tasks_dir"])]
    assert _commands("python -m lora_over_trl.sft R.yaml \\\n    --lora_over.capacity 2") == [
        ("sft", ["--lora_over.capacity"])
    ]


# ---- recipe keys in YAML blocks -------------------------------------------------------------------------


def unknown_recipe_keys(block: str, known: set[str], lora_over_fields: set[str]) -> list[str]:
    """Keys of a YAML block that a recipe would refuse. Axolotl configs (`base_model:`/`plugins:`) and accelerate
    configs (`compute_environment:`) are checked only in their `lora_over:` section."""
    data = yaml.safe_load(block)
    if not isinstance(data, dict):
        return []
    foreign = {"base_model", "plugins", "compute_environment"} & set(data)
    bad = [] if foreign else [key for key in data if key not in known | SECTIONS]
    section = data.get("lora_over")
    if isinstance(section, dict):
        bad += [f"lora_over.{key}" for key in section if key not in lora_over_fields]
    return bad


def _recipe_keys() -> tuple[set[str], set[str]]:
    from lora_over_trl.lora_over.config import LoraOverConfig
    from lora_over_trl.sft import make_parser

    known = {action.dest for action in make_parser()._actions} - {"help"}
    return known, {f.name for f in dataclasses.fields(LoraOverConfig)}


def test_yaml_blocks_use_known_recipe_keys():
    known, fields = _recipe_keys()
    problems = []
    for doc in DOCS:
        for lang, block in FENCE.findall(doc.read_text()):
            if lang in ("yaml", "yml"):
                problems += [f"{doc.name}: {key}" for key in unknown_recipe_keys(block, known, fields)]
    assert problems == []


def test_unknown_recipe_keys_are_caught():
    known, fields = _recipe_keys()
    block = "learning_rate: 1.0e-4\nlerning_rate: 2\nlora_over:\n  capacity: 1\n  capacty: 2\n"
    assert unknown_recipe_keys(block, known, fields) == ["lerning_rate", "lora_over.capacty"]
    axolotl = "base_model: x\nlora_r: 8\nlora_over:\n  schedule: dynamic\n  sched: 1\n"
    assert unknown_recipe_keys(axolotl, known, fields) == ["lora_over.sched"]


def test_shell_words_in_commands_parse():
    """The command lines the README gives a newcomer are well-formed shell."""
    text = (ROOT / "README.md").read_text()
    for lang, block in FENCE.findall(text):
        if lang == "bash":
            shlex.split(re.sub(r"\\\n", " ", block), comments=True)
    assert "make demo" in text and "make test" in text


# ---- the README's methods table against the registry ------------------------------------------------------


def readme_mode_rows(text: str) -> dict[tuple[str, str | None], dict[str, str]]:
    """The README's "where each runs" table: per (method, LoRA-Over schedule or None), its cells by column."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | DDP | FSDP2 |"))
    header = [cell.strip() for cell in lines[start].strip().strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (cell.strip() for cell in line.strip().strip("|").split("|")), strict=True))
        label = cells["method"]
        schedules = re.findall(r"static|prepass|dynamic", label) or [None]
        for name in re.findall(r"`(\w+)`", label):
            for schedule in schedules:
                rows[(name, schedule)] = cells
    return rows


def test_the_readme_modes_table_says_what_the_registry_allows():
    from lora_over_trl.registry import METHODS, build_config, refusal
    from lora_over_trl.utils.distributed import ShardedMode

    rows = readme_mode_rows((ROOT / "README.md").read_text())
    assert {name for name, _ in rows} == set(METHODS)
    modes = {
        "FSDP2": ShardedMode("fsdp", 2),
        "DeepSpeed ZeRO-2": ShardedMode("deepspeed", 2),
        "DeepSpeed ZeRO-3": ShardedMode("deepspeed", 3),
    }
    for (name, schedule), cells in rows.items():
        config = build_config(name, {"schedule": schedule} if schedule else {})
        for column, mode in modes.items():
            refused = refusal(name, config, mode) is not None
            assert cells[column].startswith("refused") == refused, (name, schedule, column, cells[column])
            if refused:  # every refusal has its stated reason below the table
                assert re.search(r"\[[a-z]\]", cells[column]), (name, column)
        on_experts = refusal(name, config, modes["FSDP2"], wrapped=True) is not None
        assert ("on MoE experts refused" in cells["FSDP2"]) == (on_experts and not cells["FSDP2"].startswith("refused"))
        assert cells["Axolotl"].startswith("no") == (METHODS[name].axolotl_refusal is not None), name
