"""benches/checks/check_vllm.py without vLLM: its token comparison on fake decodings, its rank and argument handling."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_vllm", ROOT / "benches" / "checks" / "check_vllm.py")
check_vllm = importlib.util.module_from_spec(_spec)
sys.modules["check_vllm"] = check_vllm  # dataclasses look their module up there
_spec.loader.exec_module(check_vllm)


@pytest.mark.parametrize(
    "reference, candidate, identical_prompts, identical_tokens, first_mismatch",
    [
        ([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]], 2, 5, None),
        ([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]], 1, 4, (1, 1)),  # one token differs
        ([[1, 2, 3], [4, 5]], [[9, 2, 3], [4, 6]], 0, 1, (0, 0)),  # the first mismatch is the earliest prompt's
        ([[1, 2, 3]], [[1, 2]], 0, 2, (0, 2)),  # the candidate stopped early
        ([[1, 2]], [[1, 2, 7]], 0, 2, (0, 2)),  # the candidate ran on past the reference's stop token
        ([[]], [[]], 1, 0, None),  # an immediate stop on both sides
    ],
)
def test_compare_tokens(reference, candidate, identical_prompts, identical_tokens, first_mismatch):
    result = check_vllm.compare_tokens(reference, candidate)
    assert (result.identical_prompts, result.identical_tokens, result.first_mismatch) == (
        identical_prompts,
        identical_tokens,
        first_mismatch,
    )
    assert result.prompts == len(reference)
    assert result.reference_tokens == sum(map(len, reference))
    assert result.identical == (identical_prompts == len(reference))


@pytest.mark.parametrize("reference, candidate", [([[1]], [[1], [2]]), ([], [])])
def test_compare_tokens_needs_the_same_prompts(reference, candidate):
    with pytest.raises(ValueError, match="compare_tokens"):
        check_vllm.compare_tokens(reference, candidate)


@pytest.mark.parametrize(
    "candidate_tokens, candidate_logprobs, gap",
    [
        ([[5, 6, 7], [8]], [[-0.5, -1.0, -2.0], [-0.1]], 0.0),  # the same decoding
        ([[5, 6, 7], [8]], [[-0.5, -1.25, -2.0], [-0.1]], 0.25),  # one step's log-probability moved
        ([[5, 9, 7], [8]], [[-0.5, -9.0, -9.0], [-0.1]], 0.0),  # after the first differing token: not compared
        ([[5, 6, 7], [8]], [[-0.5, -1.0, -2.0], [-0.6]], 0.5),  # the largest gap over all prompts
        ([[5, 6], [8]], [[-0.625, -1.0], [-0.1]], 0.125),  # a candidate that stopped early: its common steps
    ],
)
def test_max_logprob_gap(candidate_tokens, candidate_logprobs, gap):
    reference_tokens, reference_logprobs = [[5, 6, 7], [8]], [[-0.5, -1.0, -2.0], [-0.1]]
    found = check_vllm.max_logprob_gap(reference_tokens, reference_logprobs, candidate_tokens, candidate_logprobs)
    assert found == pytest.approx(gap, abs=1e-12)


def test_max_logprob_gap_needs_the_same_prompts():
    with pytest.raises(ValueError, match="max_logprob_gap"):
        check_vllm.max_logprob_gap([[1]], [[-0.1]], [[1]], [])


def test_prompts_differing():
    assert check_vllm.prompts_differing([[1, 2], [3], [4]], [[1, 2], [3, 0], [5]]) == 2
    assert check_vllm.prompts_differing([[1, 2]], [[1, 2]]) == 0
    with pytest.raises(ValueError, match="prompts_differing"):
        check_vllm.prompts_differing([[1]], [])


@pytest.mark.parametrize("ranks, limit", [([16], 16), ([16, 32], 32), ([16, 17], 32), ([48], 64), ([1], 1)])
def test_lora_rank_limit(ranks, limit):
    assert check_vllm.lora_rank_limit(ranks) == limit


def test_lora_rank_limit_above_vllm():
    with pytest.raises(check_vllm.CheckError, match="513"):
        check_vllm.lora_rank_limit([513])


def test_adapter_rank_reads_rank_pattern(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16, "rank_pattern": {"q_proj": 48}}))
    assert check_vllm.adapter_rank(tmp_path) == 48
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 32, "rank_pattern": None}))
    assert check_vllm.adapter_rank(tmp_path) == 32


def test_method_recipes_train_on_the_served_float32_base(tmp_path):
    for method in check_vllm.METHODS:
        recipe = check_vllm.method_recipe(method, 6, tmp_path / method)
        assert (recipe["load_in_4bit"], recipe["dtype"], recipe["max_steps"]) == (False, "float32", 6)
        assert recipe["output_dir"] == str(tmp_path / method) and recipe["merge"] is True
    assert check_vllm.method_recipe("c3la", 6, tmp_path)["cla"] == {"chain_interval": 3}  # two windows
    assert check_vllm.method_recipe("lora_over_dynamic", 6, tmp_path)["lora_over"]["final_steps"] == 2
    assert "final_steps" not in check_vllm.METHODS["lora_over_dynamic"]["lora_over"]  # the table is not mutated


def test_parse_args_defaults():
    args = check_vllm.parse_args([])
    assert args.methods == list(check_vllm.METHODS)
    assert args.merged == args.methods[:1]
    assert (args.prompts, args.max_tokens, args.steps, args.retrain) == (8, 32, 4, False)
    assert args.logprob_tolerance == 1e-3


def test_parse_args_merged():
    assert check_vllm.parse_args(["--methods", "cla", "lora"]).merged == ["cla"]
    assert check_vllm.parse_args(["--merged"]).merged == []
    assert check_vllm.parse_args(["--merged", "c3la", "lora"]).merged == ["c3la", "lora"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "glora"], "invalid choice"),
        (["--steps", "3"], "--steps must be >= 4, got 3"),
        (["--prompts", "0", "--max-tokens", "0"], "--prompts must be >= 1, got 0; --max-tokens must be >= 1"),
        (["--methods", "cla", "--merged", "lora"], "--merged lora: not among --methods"),
        (["--logprob-tolerance", "0"], "--logprob-tolerance must be > 0, got 0.0"),
    ],
)
def test_parse_args_rejects(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        check_vllm.parse_args(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_no_vllm_import():
    assert "vllm" not in sys.modules
