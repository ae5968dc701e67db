"""Column mapping for the SFT command: templates, renames, ShareGPT turns, and the errors users see."""

from __future__ import annotations

import pytest
from conftest import gsm8k_rows
from datasets import Dataset

from lora_over_trl.sft.data import DataError, check_format, load_local_or_hub, map_columns


def test_templates_build_prompt_and_completion_from_real_gsm8k():
    rows = gsm8k_rows(3)
    mapped = map_columns(
        Dataset.from_list(rows), {"prompt": "Question: {question}\nAnswer:", "completion": " {answer}"}
    )
    assert mapped.column_names == ["prompt", "completion"] and check_format(mapped) == "prompt-completion"
    assert mapped[2] == {"prompt": f"Question: {rows[2]['question']}\nAnswer:", "completion": " " + rows[2]["answer"]}


def test_alpaca_joins_instruction_and_input_and_renames_output():
    data = Dataset.from_list([{"instruction": "Add.", "input": "2 and 3", "output": "5"}])
    mapped = map_columns(data, {"prompt": "{instruction}\n\n{input}", "completion": "output"})
    assert mapped[0] == {"prompt": "Add.\n\n2 and 3", "completion": "5"}


def test_sharegpt_turns_become_messages():
    turns = [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    mapped = map_columns(Dataset.from_list([{"conversations": turns, "id": "x"}]), {"messages": "conversations"})
    assert mapped[0]["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert check_format(mapped) == "messages"


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"answer": "question"}, "dataset_columns: unknown target(s) ['answer']"),
        ({"prompt": "{title}"}, "dataset_columns.prompt: column(s) ['title'] not in the dataset"),
        ({"completion": "solution"}, "column(s) ['solution'] not in the dataset"),
        ({"messages": "{question}"}, "name a column holding a list of turns"),
    ],
)
def test_mapping_errors_name_the_field(mapping, message):
    with pytest.raises(DataError, match=None) as err:
        map_columns(Dataset.from_list(gsm8k_rows(2)), mapping)
    assert message in str(err.value)


def test_unknown_layout_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="map yours with dataset_columns"):
        check_format(Dataset.from_list(gsm8k_rows(2)))
    with pytest.raises(DataError, match="no such file or folder"):
        load_local_or_hub(str(tmp_path / "absent.jsonl"))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(DataError, match="is not one of"):
        load_local_or_hub(str(tmp_path / "data.xml"))


def test_shipped_arithmetic_set_is_reproducible_and_correct(tmp_path):
    import importlib.util
    import json
    import re
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "recipes" / "data"
    spec = importlib.util.spec_from_file_location("make_arithmetic", folder / "make_arithmetic.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator.write(tmp_path)
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (folder / "arithmetic" / name).read_bytes()
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").open()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").open()]
    assert len(train) == 2000 and len(test) == 200
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for row in train + test:  # every calculator step is right, and the final answer is the last result
        steps = re.findall(r"<<([0-9+\-*/ ]+)=(\d+)>>", row["answer"])
        assert steps and all(eval(expr) == int(value) for expr, value in steps)  # digits and operators only
        assert row["answer"].endswith(f"#### {steps[-1][1]}")
