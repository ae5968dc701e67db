"""Every shipped recipe, as written, trains end to end for a few steps on a tiny Llama with local data of its shape.

Only what cannot exist here is swapped: the hub model (a tiny Llama with the test tokenizer), the hub data (local
rows with the same columns and chat format, read through the recipe's own split name), the GPU (``use_cpu``,
``bf16: false``), the output folder, and the run length. Everything else (4-bit with nested quantization, the
paged optimizer, activation checkpointing, TensorBoard, chat templates, column mappings, the schedule's phases)
runs as a user's GPU run would, so a key the code ignores or a template that fails shows up here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import gsm8k_rows, save_tiny_llama
from safetensors.torch import load_file

from lora_over_trl.sft import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _rows(kind: str, n: int) -> list[dict]:
    """``n`` rows shaped like the recipe's hub dataset, with GSM8K questions and answers as content."""
    rows = []
    for i, r in enumerate(gsm8k_rows(n)):
        q, a = r["question"], r["answer"]
        if kind == "ultrachat":  # HuggingFaceH4/ultrachat_200k: prompt, prompt_id, multi-turn messages
            turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 2:
                turns += [{"role": "user", "content": "And in words?"}, {"role": "assistant", "content": a[:80]}]
            rows.append({"prompt": q, "prompt_id": f"{i:064x}", "messages": turns})
        elif kind == "metamath":  # meta-math/MetaMathQA
            rows.append({"query": q, "response": a, "type": "GSM_Rephrased", "original_question": q})
        elif kind == "codefeedback":  # m-a-p/CodeFeedback-Filtered-Instruction
            rows.append({"query": q, "answer": f"```python\nprint({len(a)})\n```", "resource": "gsm", "lang": "py"})
    return rows


DATA = {"ultrachat_200k": "ultrachat", "MetaMathQA": "metamath", "CodeFeedback": "codefeedback"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    folder = Path(save_tiny_llama(tmp_path_factory.mktemp("recipes") / "model"))
    tokenizer.save_pretrained(folder)
    return folder


def local_data(recipe: dict, folder: Path) -> str:
    """The recipe's data: its own local file, or local rows shaped like its hub dataset."""
    name = recipe["dataset_name"]
    if Path(ROOT / name).is_file():
        return str(ROOT / name)
    kind = next(kind for key, kind in DATA.items() if key in name)
    path = folder / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows(kind, 64)))
    return str(path)


CASES = [(p, 2) for p in RECIPES] + [(ROOT / "recipes" / "demo_cpu.yaml", s) for s in (3, 5)]


@pytest.mark.parametrize("path, steps", CASES, ids=[f"{p.stem}-{s}" for p, s in CASES])
def test_shipped_recipe_runs_for_a_few_steps(path, steps, tiny_model, tmp_path, monkeypatch, capsys):
    recipe = yaml.safe_load(path.read_text())
    monkeypatch.chdir(ROOT)  # recipes name their templates and data relative to the repository root
    out = tmp_path / "run"
    flags = ["--model_name_or_path", str(tiny_model), "--dataset_name", local_data(recipe, tmp_path)]
    flags += ["--output_dir", str(out), "--max_steps", str(steps), "--use_cpu", "true", "--bf16", "false"]
    # one row per micro-batch keeps it fast; gradient accumulation stays as the recipe sets it
    flags += ["--per_device_train_batch_size", "1", "--eval_tasks="]  # scoring: the eval tests; the flag turns it off
    assert main([str(path), *flags]) == 0, capsys.readouterr().err[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["method"] == recipe["method"]
    assert all(s["loss"] > 0 for s in summary["losses"]) and "eval" not in summary
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (
        recipe["lora_r"],
        recipe["lora_alpha"],
        recipe["lora_dropout"],
    )
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in weights)
    assert (out / "merged").is_dir() == bool(recipe.get("merge"))
    if recipe.get("report_to") == "tensorboard":
        assert list(out.rglob("events.out.tfevents.*"))  # logged where the recipe asked
    if recipe["method"] == "lora_over":
        settings = recipe["lora_over"]
        assert summary["lora_over"]["schedule"] == settings.get("schedule", "static")
        if settings.get("schedule") == "dynamic":
            phases = summary["lora_over"]["phases"]
            expected = [max(m, int(settings[k] * steps)) for k, m in (("warmup_steps", 0), ("interval", 1))]
            assert [phases["warmup"], phases["interval"]] == expected
            assert phases["last"] == steps - int(settings["final_steps"] * steps) > phases["warmup"]
        if "budget_ratio" in settings:  # prepass and dynamic spend within the recipe's budget, and spend some
            assert 0 < summary["lora_over"]["aux_params_last"] <= summary["lora_over"]["budget"]
        assert summary["collapse_max_error"] <= 1e-6
    printed = capsys.readouterr().out
    assert f"{out / 'adapter'}" in printed and f"{out / 'summary.json'}" in printed  # the run says what it made
