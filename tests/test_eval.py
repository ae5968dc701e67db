"""End to end: a tiny collapsed LoRA-Over adapter scored through the `lm_eval` command line and our runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import GSM8K_DIR, make_peft, mt_bench_questions_path, save_tiny_llama
from judge_server import MODEL, judge_server
from test_patch import train_steps

from lora_over_trl import LoraOverConfig, apply_lora_over, collapse, export_merged, save_lora_over
from lora_over_trl.eval.command import main

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = mt_bench_questions_path()


def score(path: Path, out: Path, *extra: str, tasks: str = "gsm8k", limit: int = 2) -> int:
    """Our runner on few documents with short generations; returns its exit code."""
    common = f"--tasks {tasks} --limit {limit} --num_fewshot 1 --gen_kwargs max_gen_toks=8 --device cpu".split()
    return main([str(path), *common, "--gsm8k_dir", str(GSM8K_DIR), "--output", str(out), *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer, gsm8k_batch) -> Path:
    """A run folder: base/ (tiny Llama + tokenizer), adapter/ (collapsed LoRA-Over), checkpoint/ (not collapsed)."""
    root = tmp_path_factory.mktemp("run")
    save_tiny_llama(root / "base", hidden_size=64, max_positions=1024, seed=0)
    tokenizer.save_pretrained(root / "base")
    model = make_peft(str(root / "base"), "fp32")
    apply_lora_over(model, LoraOverConfig(capacity=1.0))
    for _ in train_steps(model, gsm8k_batch, steps=2):
        pass
    save_lora_over(model, root / "checkpoint")
    collapse(model)
    model.save_pretrained(root / "adapter")
    export_merged(model, root / "merged", tokenizer=tokenizer)
    return root


def test_runner_scores_gsm8k_humaneval_and_writes_mt_bench_answers(run_dir, tmp_path, capsys):
    out = tmp_path / "scores"
    extra = ["--max_new_tokens", "4", "--mt_bench_questions", str(QUESTIONS), "--confirm_run_unsafe_code"]
    assert score(run_dir, out, *extra, tasks="gsm8k,humaneval,mt_bench") == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert "exact_match,strict-match" in results["gsm8k_local"] and "pass@1,create_test" in results["humaneval_local"]
    samples = [json.loads(line) for line in (out / "samples_humaneval_local.jsonl").read_text().splitlines()]
    assert {s["doc_id"] for s in samples} == {0, 1}
    assert "gsm8k_local" in capsys.readouterr().out  # the table
    answer_file = out / "mt_bench" / "model_answer" / f"{run_dir.name}.jsonl"  # named after the run, as FastChat reads
    answers = [json.loads(line) for line in answer_file.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 82]
    assert all(len(a["choices"][0]["turns"]) == 2 and a["model_id"] == run_dir.name for a in answers)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter"] == str(run_dir / "adapter") and summary["base"] == str(run_dir / "base")


def test_runner_writes_mt_bench_answers_and_judges_them(run_dir, tmp_path, capsys):
    """Answers, then judgments at an OpenAI-compatible endpoint (tests/judge_server.py), the scores in summary.json."""
    out = tmp_path / "judged"
    with judge_server() as server:
        argv = ["--max_new_tokens", "4", "--judge_model", MODEL, "--judge_base_url", server.url]
        assert score(run_dir, out, *argv, tasks="mt_bench", limit=2) == 0
        assert server.chats == 4  # 2 questions x 2 turns, single grading
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mt_bench"]["single"]["judged"] == 4 and summary["mt_bench"]["judge"] == MODEL
    assert (out / "mt_bench" / "model_judgment" / f"{MODEL}_single.jsonl").is_file()
    assert "# MT-Bench, judged by" in capsys.readouterr().out


def test_runner_scores_a_merged_model_like_its_adapter(run_dir, tmp_path):
    generations = {}
    for name in ("adapter", "merged"):
        assert score(run_dir / name, tmp_path / name) == 0
        samples = (tmp_path / name / "samples_gsm8k_local.jsonl").read_text().splitlines()
        generations[name] = [json.loads(line)["filtered_resps"] for line in samples]
    assert generations["adapter"] == generations["merged"]  # same greedy output: the merge is the trained function


def test_runner_loads_a_4bit_base(run_dir, tmp_path):
    assert score(run_dir / "adapter", tmp_path / "scores4", "--load_in_4bit", limit=1) == 0
    assert "gsm8k_local" in json.loads((tmp_path / "scores4" / "results.json").read_text())["results"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{run}/nowhere"], "does not exist"),
        (["{run}", "--tasks", "humaneval"], "add --confirm_run_unsafe_code"),
        (["{run}", "--tasks", "gsm8k,not_a_task"], "unknown task(s) ['not_a_task']"),
        (["{run}", "--tasks", "mt_bench", "--judge_baseline", "{run}"], "needs a judge: add --judge_model"),
        (["{run}", "--judge_model", "gpt-4"], "add mt_bench to --tasks"),
        (["{run}", "--tasks", "mt_bench", "--judge_model", "gpt-4"], "$NO_SUCH_KEY is not set"),
        (
            ["{run}", "--tasks", "mt_bench", "--judge_model", "j", "--judge_base_url", "http://127.0.0.1:9/v1"],
            "--judge_base_url http://127.0.0.1:9/v1: no endpoint",
        ),
        (["{run}/checkpoint"], "over-parameterized training checkpoint"),
        (["{run}", "--backend", "vllm", "--load_in_4bit"], "score the run's merged/"),
        (["{run}/base/..", "--limit", "0"], "--limit must be > 0"),
        (["{tmp}"], "no adapter_config.json or config.json"),
    ],
)
def test_runner_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, argv, message):
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    before = sorted(p.name for p in run_dir.iterdir())
    assert main([*argv, "--gsm8k_dir", str(GSM8K_DIR), "--judge_api_key_env", "NO_SUCH_KEY"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written


def test_the_printed_lm_eval_lines_use_arguments_lm_eval_takes(run_dir):
    """The hf and vllm lines of the end-of-run report: lm-eval's own argument names (read from its source, vLLM
    being absent here), the adapter as a LoRA request whose rank limit vLLM accepts."""
    import ast

    import lm_eval

    from lora_over_trl.eval.backends import VLLM_LORA_RANKS, choose_backend
    from lora_over_trl.eval.command import make_parser, plain_lm_eval_command

    args = make_parser().parse_args(["x", "--tasks", "gsm8k", "--limit", "5", "--dtype", "bfloat16"])
    adapter = run_dir / "adapter"
    hf = plain_lm_eval_command(str(run_dir / "base"), args, peft=str(adapter))
    vllm = plain_lm_eval_command(str(run_dir / "base"), args, peft=str(adapter), model="vllm")
    assert f"pretrained={run_dir / 'base'},dtype=bfloat16,peft={adapter}" in hf and "--model hf" in hf
    rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    limit = min(r for r in VLLM_LORA_RANKS if r >= rank)
    assert f"dtype=bfloat16,lora_local_path={adapter},max_lora_rank={limit}" in vllm and "--batch_size auto" in vllm
    source = Path(lm_eval.__file__).parent / "models" / "vllm_causallms.py"
    model_class = next(
        node
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.ClassDef) and node.name == "VLLM"
    )
    init = next(node for node in model_class.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    accepted = {a.arg for a in init.args.args + init.args.kwonlyargs}
    model_args = vllm.split("--model_args ")[1].split()[0]
    assert {pair.split("=")[0] for pair in model_args.split(",")} <= accepted
    assert choose_backend("auto") == "hf"  # no vLLM here
