"""MT-Bench: answers generated with FastChat's settings, judged at an OpenAI-compatible endpoint (a local HTTP judge
with fixed replies, tests/judge_server.py), scored as FastChat's show_result.py scores."""

from __future__ import annotations

import ast
import json
import random
import sys
from pathlib import Path
from statistics import mean

import pytest
from judge_server import MODEL, judge_server

from lora_over_trl.eval.command import main
from lora_over_trl.eval.fastchat_data import fastchat_setting, llm_judge_folder
from lora_over_trl.eval.judge import parse_rating, parse_winner
from lora_over_trl.eval.judge_results import pairwise_rates, single_scores
from lora_over_trl.eval.mt_bench import MAX_NEW_TOKENS, TEMPERATURE, answer_questions, read_questions

QUESTIONS = read_questions()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches" / "checks"))
import check_judge  # noqa: E402  (benches/checks/check_judge.py: FastChat's show_result.py, run and read)


def test_sampling_is_the_judge_packages_own():
    """Temperatures per category and the answer length are FastChat's, read from the package's own source."""
    assert TEMPERATURE == fastchat_setting("common.py", "temperature_config")
    tree = ast.parse((llm_judge_folder() / "scripts" / "gen_model_answer.py").read_text())
    defaults = {
        node.args[0].value: next(k.value.value for k in node.keywords if k.arg == "default")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", "") == "add_argument"
        and node.args
        and any(k.arg == "default" for k in node.keywords)
    }
    assert MAX_NEW_TOKENS == defaults["--max-new-token"] == 1024
    from lora_over_trl.eval.command import make_parser

    assert make_parser().parse_args(["x"]).max_new_tokens == MAX_NEW_TOKENS
    assert {q["category"] for q in QUESTIONS} <= set(TEMPERATURE)  # no question falls back to the default


def test_each_question_is_sampled_at_its_category_temperature_and_turn_two_follows_the_models_answer():
    calls = []

    def generate(conversations, temperatures):
        calls.append(([list(c) for c in conversations], temperatures))  # as asked, before the replies
        return [f"reply {len(c)} to {c[-1]['content'][:12]}" for c in conversations]

    answers = answer_questions(QUESTIONS, generate, "m")
    expected = fastchat_setting("common.py", "temperature_config")
    for _, temperatures in calls:
        assert temperatures == [expected[q["category"]] for q in QUESTIONS]
    assert [q["category"] for q, t in zip(QUESTIONS, calls[0][1], strict=True) if t == 0.0] == [
        q["category"] for q in QUESTIONS if q["category"] in ("math", "coding", "reasoning", "extraction")
    ]
    (first, _), (second, _) = calls
    for question, conversation, answer in zip(QUESTIONS, second, answers, strict=True):
        turn1 = f"reply 1 to {question['turns'][0][:12]}"
        assert [m["role"] for m in conversation] == ["user", "assistant", "user"]
        assert conversation[1]["content"] == turn1 and conversation[2]["content"] == question["turns"][1]
        assert answer["choices"][0]["turns"] == [turn1, f"reply 3 to {question['turns'][1][:12]}"]


@pytest.mark.parametrize(
    "text, rating",
    [
        ("Helpful and correct.\n\nRating: [[8]]", 8.0),
        ("Rating: [[7.5]]", 7.5),
        ("I would give it [6] overall", 6.0),  # FastChat's fallback pattern
        ("Rating: 9/10", -1.0),  # no bracketed rating: unparsable, not 0
        ("", -1.0),
    ],
)
def test_ratings_are_parsed_as_fastchat_parses_them(text, rating):
    assert parse_rating(text) == rating


@pytest.mark.parametrize(
    "text, winner", [("... [[A]]", "A"), ("[[B]]", "B"), ("a tie: [[C]]", "tie"), ("A is better", "error")]
)
def test_pairwise_verdicts(text, winner):
    assert parse_winner(text) == winner


def test_scores_match_an_independent_count():
    rng = random.Random(4)
    categories = {q["question_id"]: q["category"] for q in QUESTIONS}
    rows = [
        {"question_id": q["question_id"], "model": "m", "turn": turn, "score": rng.choice([-1, 1, 4, 7.5, 10])}
        for q in QUESTIONS
        for turn in (1, 2)
    ]
    scores = single_scores(rows + [{**rows[0], "model": "other", "score": 1}], categories, "m")
    rated = [r for r in rows if r["score"] != -1]
    assert scores["score"] == pytest.approx(mean(r["score"] for r in rated), abs=1e-4)
    assert scores["turn_2"] == pytest.approx(mean(r["score"] for r in rated if r["turn"] == 2), abs=1e-4)
    writing = [r["score"] for r in rated if categories[r["question_id"]] == "writing" and r["turn"] == 1]
    assert scores["categories"]["writing"]["turn_1"] == pytest.approx(mean(writing), abs=1e-4)
    assert scores["unparsable"] == len(rows) - len(rated) > 0 and scores["judged"] == len(rows)

    games = [("model_1", "model_1"), ("model_2", "model_2"), ("tie", "tie"), ("model_1", "model_2"), ("error", "x")]
    pair_rows = [
        {"model_1": "m", "model_2": "b", "g1_winner": g1, "g2_winner": g2, "question_id": i}
        for i, (g1, g2) in enumerate(games)
    ]
    rates = pairwise_rates(pair_rows, "m", "b")
    assert (rates["win"], rates["tie"], rates["loss"], rates["no_verdict"]) == (1, 2, 1, 1)
    assert rates["win_rate_adjusted"] == pytest.approx((1 + 0.5 * 2) / 4)


def write_answers(folder: Path, model: str, prefix: str, ids: list[int]) -> Path:
    path = folder / "mt_bench" / "model_answer" / f"{model}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    by_id = {q["question_id"]: q for q in QUESTIONS}
    rows = []
    for qid in ids:
        turns = [f"{prefix} answer to: {t[:30]}" for t in by_id[qid]["turns"]]
        if qid == ids[-1] and prefix == "GOOD":
            turns[1] += " NO-VERDICT"  # only the turn-2 prompts show it
        rows.append({"question_id": qid, "model_id": model, "choices": [{"index": 0, "turns": turns}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# a writing question, a math one (graded against GPT-4's reference) and a coding one
IDS = [81, 111, 121]


def test_judging_single_and_pairwise_resumes_and_counts_unparsable_replies(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    eval_dir, baseline = tmp_path / "eval", tmp_path / "twin"
    answers = write_answers(eval_dir, "lora_over_run", "GOOD", IDS)
    write_answers(baseline, "lora_run", "BAD", IDS)
    before = answers.read_text()
    argv = [str(eval_dir), "--judge_model", MODEL, "--judge_baseline", str(baseline), "--judge_parallel", "3"]
    with judge_server(fail_first=1) as server:  # the first request gets a 503: retried with backoff
        assert main([*argv, "--judge_base_url", server.url]) == 0
        # 3 questions x 2 turns: 6 single gradings, 6 pairwise matches judged in both orders
        assert server.chats == 6 + 12
        assert main([*argv, "--judge_base_url", server.url]) == 0
        assert server.chats == 18  # a rerun asks nothing again
    assert answers.read_text() == before
    judgments = eval_dir / "mt_bench" / "model_judgment"
    single = [json.loads(line) for line in (judgments / f"{MODEL}_single.jsonl").read_text().splitlines()]
    pair = [json.loads(line) for line in (judgments / f"{MODEL}_pair.jsonl").read_text().splitlines()]
    assert sorted((r["question_id"], r["turn"]) for r in single) == [(q, t) for q in IDS for t in (1, 2)]
    names = {(r["question_id"], r["turn"]): r["judge"][1] for r in single}
    assert names[(81, 1)] == "single-v1" and names[(111, 2)] == "single-math-v1-multi-turn"
    math = next(r for r in single if r["question_id"] == 111 and r["turn"] == 1)
    assert "Reference Answer" in math["user_prompt"]  # GPT-4's reference, shown for math
    summary = json.loads((eval_dir / "summary.json").read_text())["mt_bench"]
    scores = summary["single"]
    # question 121 turn 2 has no verdict: counted, left out of the mean (8 everywhere else)
    assert scores["unparsable"] == 1 and scores["score"] == 8.0 and scores["judged"] == 6
    rates = summary["pairwise"]
    assert rates["baseline"] == "lora_run" and rates["no_verdict"] == 1
    assert (rates["win"], rates["tie"], rates["loss"]) == (5, 0, 0)  # GOOD chosen in both orders
    assert all(r["g1_winner"] == "model_1" and r["g2_winner"] == "model_1" for r in pair if r["question_id"] != 121)
    assert "judged by recorded-judge" in capsys.readouterr().out
    assert (eval_dir / "mt_bench" / "results.md").is_file() and (eval_dir / "mt_bench" / "categories.png").is_file()

    # FastChat's own show_result.py reads the files back to the same numbers (the check's parser of its print)
    shown = check_judge.fastchat_show_result(judgments / f"{MODEL}_single.jsonl", "single")
    assert check_judge.show_result_value(shown, "########## Average ##########", "lora_over_run") == scores["score"]
    shown = check_judge.fastchat_show_result(judgments / f"{MODEL}_pair.jsonl", "pairwise-all")
    assert check_judge.show_result_column(shown, "lora_over_run", "win_rate_adjusted") == rates["win_rate_adjusted"]

    # a judgment lost (an interrupted run) is the only one asked for again
    lines = (judgments / f"{MODEL}_single.jsonl").read_text().splitlines()
    (judgments / f"{MODEL}_single.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with judge_server() as server:
        assert main([*argv, "--judge_base_url", server.url]) == 0
        assert server.chats == 1


def test_judge_failures_are_one_line_and_keep_the_answers(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    eval_dir = tmp_path / "eval"
    answers = write_answers(eval_dir, "run", "GOOD", IDS)
    before = sorted(p.relative_to(eval_dir) for p in eval_dir.rglob("*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with judge_server() as server:
        dead = server.url
        cases = [
            ([str(eval_dir), "--judge_model", "gpt-4"], "$OPENAI_API_KEY is not set"),
            ([str(eval_dir), "--judge_model", "gpt-4o", "--judge_base_url", server.url], "--judge_model gpt-4o"),
            (
                [
                    str(eval_dir),
                    "--judge_model",
                    MODEL,
                    "--judge_base_url",
                    server.url,
                    "--judge_baseline",
                    str(empty),
                ],
                "--judge_baseline",
            ),
            ([str(eval_dir)], "--judge_model"),
        ]
        for argv, message in cases:
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert main([str(eval_dir), "--judge_model", MODEL, "--judge_base_url", dead]) == 2  # server gone
    err = capsys.readouterr().err.strip()
    assert f"--judge_base_url {dead}" in err and "\n" not in err
    assert sorted(p.relative_to(eval_dir) for p in eval_dir.rglob("*")) == before
    assert answers.is_file()


def test_structured_outputs_ask_for_fastchats_verdict_format(tmp_path, monkeypatch):
    """--judge_structured_outputs sends a regex that the judge's well-formed replies match and bracket-free rambling
    cannot end without a verdict."""
    import re

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    eval_dir, baseline = tmp_path / "eval", tmp_path / "twin"
    write_answers(eval_dir, "run", "GOOD", IDS[:1])
    write_answers(baseline, "twin", "BAD", IDS[:1])
    argv = [str(eval_dir), "--judge_model", MODEL, "--judge_baseline", str(baseline), "--judge_structured_outputs"]
    with judge_server() as server:
        assert main([*argv, "--judge_base_url", server.url, "--judge_max_tokens", "64"]) == 0
    single, pair = sorted(set(server.regexes), key=len, reverse=True)
    assert len(server.regexes) == 2 + 4  # every request carried one
    assert re.fullmatch(single, "Accurate and detailed. Rating: [[8]]")
    assert re.fullmatch(single, "Rating: [[10]]") and not re.fullmatch(single, "Rating: [[11]]")
    assert not re.fullmatch(single, "Good answer, I would say [8] overall")
    assert not re.fullmatch(single, "x" * 2 * 64 + "Rating: [[5]]")  # no room past the token budget
    assert re.fullmatch(pair, "A follows the question more closely. [[A]]") and not re.fullmatch(pair, "[[D]]")
