"""The SFT command end to end: tiny Llama recipes (fp32, 4-bit), resume, two processes, bad input, shipped recipes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import GSM8K_DIR, free_port, gsm8k_rows, load_base, logits, save_tiny_llama
from judge_server import MODEL as JUDGE
from judge_server import judge_server
from safetensors.torch import load_file

from lora_over_trl.sft import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer):
    """A tiny Llama folder with its tokenizer, and real GSM8K rows as a local jsonl file."""
    return make_workspace(tmp_path_factory.mktemp("sft"), tokenizer)


def make_workspace(root: Path, tokenizer) -> Path:
    """The ``workspace`` fixture's folder, made in ``root`` (for other test modules' fixtures)."""
    model = save_tiny_llama(root / "model")
    tokenizer.save_pretrained(model)
    with (root / "train.jsonl").open("w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in gsm8k_rows(64))
    return root


def write_recipe(workspace: Path, out: Path, **overrides) -> Path:
    recipe = {
        "model_name_or_path": str(workspace / "model"),
        "dtype": "float32",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_modules": "all-linear",
        "dataset_name": str(workspace / "train.jsonl"),
        "dataset_columns": {"prompt": "Question: {question}\nAnswer:", "completion": " {answer}"},
        "max_length": 96,
        "output_dir": str(out / "run"),
        "use_cpu": True,
        "bf16": False,
        "max_steps": 8,
        "per_device_train_batch_size": 2,
        "learning_rate": 3e-2,
        "optim": "adamw_torch",
        "logging_steps": 1,
        "save_steps": 4,
        "report_to": "none",
        "seed": 7,
        "lora_over": {"schedule": "dynamic", "budget_ratio": 0.5, "warmup_steps": 2, "interval": 2, "final_steps": 2},
    }
    recipe.update(overrides)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_command(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), "-m", "lora_over_trl.sft", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ})


def run_in_process(*args: str) -> None:
    """The command run by ``main`` in this process, which must succeed (its stderr is in pytest's report): the same
    run as ``python -m lora_over_trl.sft`` without a fresh interpreter's imports. The module entry point itself runs
    in the launcher tests here and in test_distributed, and the installed console script in test_wheel."""
    assert main(list(args)) == 0


def stock_peft_logits(base_dir: str, adapter: Path, kind: str, batch) -> torch.Tensor:
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(load_base(base_dir, kind), adapter), *batch)


@pytest.fixture(scope="module")
def default_run(workspace, tmp_path_factory) -> Path:
    """The default recipe (fp32, dynamic LoRA-Over, 8 steps, checkpoints at 4 and 8) with ``merge``, through the
    command once: the fp32 case of the recipe test, and the resume test's uninterrupted run and interrupted one (a
    copy, cut back to checkpoint-4). Returns its output folder; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("default")
    run_in_process(str(write_recipe(workspace, out, merge=True)))
    return out / "run"


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_recipe_trains_collapses_and_writes_a_standard_adapter(workspace, tmp_path, gsm8k_batch, kind, request):
    if kind == "fp32":
        run = request.getfixturevalue("default_run")
    else:
        extra = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
        run_in_process(str(write_recipe(workspace, tmp_path, **extra)))
        run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["method"] == "lora_over" and summary["world_size"] == 1
    assert len(summary["losses"]) == 8 and all(torch.isfinite(torch.tensor(s["loss"])) for s in summary["losses"])
    first, last = (sum(s["loss"] for s in part) / 3 for part in (summary["losses"][:3], summary["losses"][-3:]))
    assert last < first - 0.05  # it learns
    assert summary["tokens"] > 0 and summary["peak_cpu_memory_bytes"] > 0
    # on 4-bit, TRL trains the cores in bfloat16; the final collapse stores float32 and stays exact
    assert summary["collapse_max_error"] <= 1e-6
    assert summary["lora_over"]["reallocations"] >= 1
    history = json.loads((run / "lora_over_history.json").read_text())
    assert history[-1]["event"] == "collapse" and (run / "lora_over_allocation.png").stat().st_size > 0
    # a standard PEFT adapter: plain keys only, loads in stock PEFT, same tokenizer beside it
    adapter = run / "adapter"
    keys = load_file(adapter / "adapter_model.safetensors")
    assert keys and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (adapter / "tokenizer_config.json").is_file()
    assert any(v.abs().max() > 0 for k, v in keys.items() if "lora_B" in k)  # B really trained
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no staging leftovers
    if kind == "fp32":
        from transformers import AutoModelForCausalLM

        expected = stock_peft_logits(str(workspace / "model"), adapter, "fp32", gsm8k_batch)
        merged = AutoModelForCausalLM.from_pretrained(run / "merged")
        assert (logits(merged, *gsm8k_batch) - expected).abs().max() <= 1e-4


def test_resume_continues_to_the_same_adapter(workspace, tmp_path, default_run):
    # the uninterrupted run is default_run; a copy of it, cut back to what an interruption after step 4 leaves
    # (only checkpoint-4), is resumed with the same recipe in its own folder
    recipe = write_recipe(workspace, tmp_path / "b", merge=True)
    run = tmp_path / "b" / "run"
    shutil.copytree(default_run, run)
    for name in ("checkpoint-8", "adapter", "merged", "summary.json"):
        subprocess.run(["rm", "-rf", str(run / name)], check=True)
    # a marker in the checkpoint's log history shows the resumed run really started from it
    state_file = run / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][0]["loss"] = 123.0
    state_file.write_text(json.dumps(state))
    run_in_process(str(recipe), "--resume_from_checkpoint", "true")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["losses"][0]["loss"] == 123.0
    assert summary["resumed_from"] == str(run / "checkpoint-4")
    ours = load_file(run / "adapter" / "adapter_model.safetensors")
    reference = load_file(default_run / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == reference.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_processes_through_accelerate(workspace, tmp_path, gsm8k_batch):
    # The shipped DDP config as GPU users run it: on CPU `accelerate launch --cpu` would run one process; its
    # `distributed_type: MULTI_GPU` is the torchrun launcher, and the recipe's `use_cpu: true` makes the Trainer use
    # gloo.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launcher += [str(ROOT / "examples" / "accelerate" / "ddp.yaml"), "--num_processes", "2"]
    launcher += ["--main_process_port", str(free_port())]
    done = run_command(str(write_recipe(workspace, tmp_path)), launcher=launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8 and summary["collapse_max_error"] <= 1e-6
    assert summary["lora_over"]["reallocations"] >= 1
    # The collapsed adapter, reloaded in stock PEFT, is the function the two ranks trained: the last checkpoint's
    # over-parameterized state (bank storage, layouts), restored onto a fresh model, gives the same logits.
    from peft import PeftModel

    from lora_over_trl import load_lora_over

    run = tmp_path / "run"
    out = stock_peft_logits(str(workspace / "model"), run / "adapter", "fp32", gsm8k_batch)
    trained = PeftModel.from_pretrained(load_base(str(workspace / "model"), "fp32"), run / "checkpoint-8")
    load_lora_over(trained, run / "checkpoint-8")
    torch.testing.assert_close(out, logits(trained, *gsm8k_batch), rtol=0, atol=1e-5)
    initial = stock_peft_logits(str(workspace / "model"), run / "checkpoint-4", "fp32", gsm8k_batch)
    assert (out - initial).abs().max() > 1e-3  # and it moved after step 4: the comparison is not vacuous


def test_plain_lora_twin_trains_then_scores_adapter_and_base(workspace, tmp_path, capsys):
    judge = f"--max_new_tokens 4 --judge_model {JUDGE}"  # MT-Bench judged at a local OpenAI-compatible endpoint
    scoring = {
        "eval_tasks": "gsm8k,mt_bench",
        "eval_base": True,
        "eval_args": f"--gsm8k_dir {GSM8K_DIR} --limit 2 --num_fewshot 0 --gen_kwargs max_gen_toks=8 {judge}",
    }
    with judge_server() as server:
        scoring["eval_args"] += f" --judge_base_url {server.url}"
        recipe = write_recipe(workspace, tmp_path, method="lora", lora_over=None, **scoring)
        run_in_process(str(recipe), "--max_steps", "2")
        assert server.chats == 2 * 4  # adapter and base: 2 questions x 2 turns each
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    judged = summary["eval"]["adapter"][f"mt_bench (judge {JUDGE})"]
    assert judged["score"] == json.loads((run / "eval" / "summary.json").read_text())["mt_bench"]["single"]["score"]
    report = capsys.readouterr().out
    assert f"mt_bench (judge {JUDGE}), score" in report  # in the final report, beside GSM8K
    assert "lm_eval --model hf" in report and f"lora_local_path={run / 'adapter'}" in report  # and the vllm line
    assert summary["method"] == "lora" and summary["steps"] == 2 and "collapse_max_error" not in summary
    assert not (run / "lora_over_history.json").exists()
    for label, folder in (("adapter", "eval"), ("base", "eval-base")):
        scores = summary["eval"][label]["gsm8k_local"]
        assert scores["sample_len"] == 2
        written = json.loads((run / folder / "results.json").read_text())["results"]["gsm8k_local"]
        assert written["exact_match,strict-match"] == scores["exact_match,strict-match"]
        rows = [json.loads(line) for line in (run / folder / "samples_gsm8k_local.jsonl").open()]
        assert {r["doc_id"] for r in rows} == {0, 1}  # a row per document and filter
        for name in ("strict-match", "flexible-extract"):  # the score is the mean of the per-document ones
            per_doc = [float(r["exact_match"]) for r in rows if r["filter"] == name]
            assert len(per_doc) == 2 and scores[f"exact_match,{name}"] == pytest.approx(sum(per_doc) / 2)
    recorded = json.loads((run / "eval-base" / "summary.json").read_text())
    assert recorded["adapter"] is None and recorded["base"] == str(workspace / "model")


def test_chained_cla_through_the_command_on_a_4bit_base(workspace, tmp_path, gsm8k_batch):
    recipe = write_recipe(workspace, tmp_path, method="c3la", lora_over=None, load_in_4bit=True)
    run_in_process(str(recipe), "--cla.chain_interval", "3")
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "c3la" and summary["cla"] == {"rank": 24, "windows": 3, "chain_every": 3}  # 3, 6
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 24 and config["lora_alpha"] / config["r"] == 16 / 8  # rank 3 r, same scaling
    keys = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(v.shape[0 if "lora_A" in k else 1] == 24 for k, v in keys.items())
    assert (run / "checkpoint-4" / "cla_chain.json").is_file()


def test_glora_through_the_command_on_a_4bit_base(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    search = {
        "ranks": [4, 8],
        "population": 6,
        "generations": 3,
        "top_k": 2,
        "search_batches": 2,
        "search_fraction": 0.25,
    }
    scoring = {"eval_tasks": "gsm8k", "eval_args": f"--gsm8k_dir {GSM8K_DIR} --limit 2 --gen_kwargs max_gen_toks=8"}
    recipe = write_recipe(
        workspace, tmp_path, method="glora", lora_over=None, load_in_4bit=True, glora=search, **scoring
    )
    run_in_process(str(recipe), "--glora.mutation_count", "3", "--glora.crossover_count", "3")
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    record = json.loads((run / "glora_search.json").read_text())
    assert summary["method"] == "glora" and summary["steps"] == 8
    assert len(record["history"]) == 3 and record["config"]["population"] == 6 and record["config"]["ranks"] == [4, 8]
    assert summary["glora"]["held_out_loss"] == pytest.approx(-record["fitness"])
    assert summary["glora"]["params"] == record["params"] > 0
    scored = json.loads((run / "eval" / "summary.json").read_text())
    assert scored["base"] == str(run / "merged") and scored["adapter"] is None  # the merged model, as saved
    assert summary["eval"]["adapter"]["gsm8k_local"]["sample_len"] == 2
    # the merged folder is what stock transformers loads; adapter/ exists only for a LoRA-shaped choice
    assert (run / "adapter").exists() == (summary["glora"]["not_lora"] is None)
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    gains_bias = [n for n, c in record["choices"].items() if c["C"] != "none" or c["E"] != "none"]
    assert merged.config.mlp_bias == any("mlp" in n for n in gains_bias)
    assert merged.config.attention_bias == any("self_attn" in n for n in gains_bias)
    base = load_base(str(workspace / "model"), "nf4").dequantize()
    changed = [n for n, c in record["choices"].items() if c["A"] != "none" or c["B"] != "none"]
    assert any(not torch.equal(merged.get_submodule(n).weight, base.get_submodule(n).weight.float()) for n in changed)


BAD_INPUT = [
    ({"learning_rat": 1e-3}, [], "unknown key `learning_rat` (did you mean `learning_rate`?)"),
    ({}, ["--per_device_batch_size", "4"], "unknown flag `--per_device_batch_size` (did you mean"),
    ({"dataset_name": "missing/train.jsonl"}, [], "dataset_name: no such file or folder: missing/train.jsonl"),
    ({"dataset_columns": {"prompt": "{problem}"}}, [], "dataset_columns.prompt: column(s) ['problem'] not in"),
    ({"dataset_columns": None}, [], "but SFT needs `messages`, `prompt` + `completion`"),
    ({"method": "lora_under"}, [], "method: 'lora_under' is not one of ['lora_over', 'lora', 'cla', 'rcla'"),
    ({"method": "c3la"}, [], "lora_over: settings given but method is 'c3la'"),
    ({"method": "c3la", "lora_over": None, "cla": {"chain_intervall": 2}}, [], "did you mean 'chain_interval'"),
    ({"method": "cla", "lora_over": None}, ["--cla.method", "c3la"], "set the variant with the top-level `method`"),
    ({}, ["--lora_over.capacity", "-1"], "lora_over: "),
    ({"method": "glora", "lora_over": None, "glora": {"populaton": 4}}, [], "glora: unknown GloraConfig keys"),
    ({"method": "glora", "lora_over": None}, ["--glora.ranks", "[16]"], "glora: glora.ranks: 16 exceeds the LoRA"),
    ({"method": "glora", "lora_over": None, "max_length": 8}, [], "glora: no held-out row left for the search"),
    ({}, ["--lora_over.schedul", "static"], "did you mean 'schedule'"),
    ({}, ["--resume_from_checkpoint", "true"], "resume_from_checkpoint: no checkpoint-N folder"),
    ({"eval_tasks": "gsm9k"}, [], "eval_tasks/eval_args: unknown task(s) ['gsm9k']"),
    ({"eval_tasks": "gsm8k", "eval_args": "--bogus 1"}, [], "eval_tasks/eval_args: unknown flag --bogus"),
    (
        {"eval_tasks": "mt_bench", "eval_args": "--judge_model gpt-4 --judge_api_key_env NO_KEY_HERE"},
        [],
        "eval_tasks/eval_args: --judge_api_key_env: $NO_KEY_HERE is not set",
    ),
    ({"lora_over": {"schedule": "dynamic", "budget": 1}}, [], "lora_over: LoraOverCallback: a budget of 1"),
    # values TRL, transformers or PEFT would take and then fail on deep inside (or silently train nothing with)
    ({"learning_rate": -1}, [], "learning_rate: -1 is not allowed; use a number > 0"),
    ({}, ["--learning_rate", "0"], "learning_rate: 0.0 is not allowed"),
    ({"per_device_train_batch_size": 0}, [], "per_device_train_batch_size: 0 is not allowed; use an integer >= 1"),
    ({"gradient_accumulation_steps": 0}, [], "gradient_accumulation_steps: 0 is not allowed"),
    ({"max_steps": 0}, [], "max_steps: 0 is not allowed; use an integer >= 1, or -1 for epochs"),
    ({"max_steps": -1, "num_train_epochs": 0}, [], "num_train_epochs: 0 is not allowed"),
    ({"save_steps": 0}, [], "save_steps: 0 is not allowed"),
    ({"max_length": 0}, [], "max_length: 0 is not allowed"),
    ({"max_grad_norm": -1}, [], "max_grad_norm: -1 is not allowed"),
    ({"dtype": "float17"}, [], "dtype: 'float17' is not allowed; use one of ['auto', 'float32', 'bfloat16'"),
    ({"lora_alpha": 0}, [], "lora_alpha: 0 is not allowed"),
    ({"lora_r": 0}, [], "lora_r: `r` should be a positive integer"),
    ({"lora_dropout": 1.5}, [], "lora_dropout: dropout probability has to be between 0 and 1"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf5"}, [], "bnb_4bit_quant_type: 'nf5' is not allowed"),
    ({"lr_scheduler_type": "cosinus"}, [], "lr_scheduler_type: cosinus is not a valid SchedulerType"),
    ({"report_to": "tensorbored"}, [], "report_to: 'tensorbored' is not an integration"),
    ({"chat_template_path": "missing.jinja"}, [], "chat_template_path: 'missing.jinja' is not a file"),
    ({"output_dir": "/proc/no/run"}, [], "output_dir: '/proc/no/run' cannot be created in /proc"),
    ({"lora_over": {"beta1": "high"}}, [], "lora_over: invalid LoraOverConfig: `beta1` must be a number in [0, 1)"),
    ({"learning_rate": -1, "dtype": "float17"}, ["--lora_over.capacity", "-1"], "3 problems: learning_rate: -1"),
    ({"lora_over": {"warmup_steps": 4, "final_steps": 8, "schedule": "dynamic"}}, [], "leaves no re-allocation"),
]


@pytest.mark.parametrize("overrides, flags, message", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workspace, tmp_path, capsys, overrides, flags, message):
    recipe = write_recipe(workspace, tmp_path, **overrides)
    assert main([str(recipe), *flags]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # progress bars may come first, on stderr too
    assert last.startswith("error: ") and message in last and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_empty_data_is_named_before_anything_is_written(workspace, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main([str(write_recipe(workspace, tmp_path, dataset_name=str(tmp_path / "empty.jsonl")))]) == 2
    assert f"dataset_name: {tmp_path / 'empty.jsonl'} is empty" in capsys.readouterr().err
    (tmp_path / "blank.jsonl").write_text("\n")
    assert main([str(write_recipe(workspace, tmp_path, dataset_name=str(tmp_path / "blank.jsonl")))]) == 2
    assert "has no rows" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_recipe_that_does_not_parse(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model_name_or_path: [unclosed\n")
    assert main([str(tmp_path / "bad.yaml")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert main([str(tmp_path / "absent.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_another_runs_output_dir_is_refused_and_kept(workspace, tmp_path, capsys):
    previous = tmp_path / "run" / "checkpoint-4"
    previous.mkdir(parents=True)
    (previous / "trainer_state.json").write_text("{}")
    assert main([str(write_recipe(workspace, tmp_path))]) == 2
    assert "holds another run (checkpoint-4" in capsys.readouterr().err
    assert (previous / "trainer_state.json").read_text() == "{}"


def test_load_in_4bit_without_a_working_bitsandbytes(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets where it is absent
    assert main([str(write_recipe(workspace, tmp_path, load_in_4bit=True))]) == 2
    assert "load_in_4bit: bitsandbytes cannot run here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_llama2_chat_template_marks_only_assistant_turns(tokenizer):
    template = (ROOT / "recipes" / "templates" / "llama2_chat.jinja").read_text()
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"},
    ]
    text = tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False)
    eos = tokenizer.eos_token
    assert text == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 + 3? [/INST] 5 " + eos + "[INST] And 4 + 4? [/INST] 8 " + eos
    )
    out = tokenizer.apply_chat_template(
        chat, chat_template=template, return_dict=True, return_assistant_tokens_mask=True
    )
    trained = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m])
    assert trained == " 5 " + eos + " 8 " + eos
