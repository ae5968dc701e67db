"""Loss landscapes: the grid against a quadratic loss known in closed form; the command on a tiny adapter."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
import torch
from conftest import gsm8k_rows, make_peft, save_tiny_llama

from lora_over_trl.analyze.command import main
from lora_over_trl.analyze.landscape import filter_normalized_direction, landscape_grid, sharpness


def test_grid_of_a_quadratic_loss_is_the_closed_form_and_params_come_back():
    generator = torch.Generator().manual_seed(21)
    params = [torch.randn(6, 5, generator=generator), torch.randn(3, generator=generator)]
    optimum = [torch.randn_like(p) for p in params]
    weights = [torch.rand(p.shape, generator=generator) + 0.5 for p in params]
    before = [p.clone() for p in params]

    def loss() -> float:
        return float(sum((w * (p - o) ** 2).sum() for p, o, w in zip(params, optimum, weights, strict=True)))

    d1, d2 = (filter_normalized_direction(params, generator) for _ in range(2))
    coordinates = [-1.0, -0.5, 0.0, 0.5, 1.0]
    grid = landscape_grid(loss, params, [d1, d2], coordinates)
    for i, a in enumerate(coordinates):
        for j, b in enumerate(coordinates):
            expected = sum(
                (w * (p + a * x + b * y - o) ** 2).sum()
                for p, o, w, x, y in zip(before, optimum, weights, d1, d2, strict=True)
            )
            assert grid[i][j] == pytest.approx(float(expected), rel=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))  # restored exactly
    curve = landscape_grid(loss, params, [d1], coordinates)
    assert curve == pytest.approx([row[2] for row in grid], rel=1e-6)  # the beta = 0 column


def test_filter_normalization_matches_each_rows_norm():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(7, 9, generator=generator)
    weight[3] = 0.0  # a zero row stays zero (an untrained LoRA B row)
    (direction,) = filter_normalized_direction([weight], generator)
    assert torch.allclose(direction.norm(dim=1), weight.norm(dim=1), rtol=1e-5)
    assert direction[3].abs().max() == 0


def test_sharpness_of_a_parabola():
    coordinates = [-2.0, -1.0, 0.0, 1.0, 2.0]
    summary = sharpness([3.0 * c * c + 1.0 for c in coordinates], coordinates)
    assert summary == {"center_loss": 1.0, "radius": 2.0, "mean_rise_at_radius": 12.0, "max_rise": 12.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("landscape")
    base = save_tiny_llama(root / "base")
    make_peft(base, "fp32", seed=3, init_lora_weights=False).save_pretrained(root / "run" / "adapter")
    tokenizer.save_pretrained(root / "run" / "adapter")
    with (root / "test.jsonl").open("w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in gsm8k_rows(6))
    return root


def test_command_draws_1d_and_2d_landscapes_that_agree(run, tmp_path):
    common = ["landscape", str(run / "run"), "--data", str(run / "test.jsonl"), "--grid", "3", "--examples", "6"]
    assert main([*common, "--output", str(tmp_path / "one")]) == 0
    assert main([*common, "--dims", "2", "--output", str(tmp_path / "two")]) == 0
    one, two = (json.loads((tmp_path / d / "landscape.json").read_text()) for d in ("one", "two"))
    assert one["coordinates"] == [-1.0, 0.0, 1.0] and one["examples"] == 6
    # the same seed gives the same first direction: the 2-D grid's beta = 0 column is the 1-D curve
    assert [row[1] for row in two["losses"]] == pytest.approx(one["losses"], rel=1e-6)
    assert one["sharpness"]["center_loss"] == pytest.approx(one["losses"][1])
    assert one["sharpness"]["max_rise"] > 0  # the trained point is not a maximum along a random direction
    for folder in ("one", "two"):
        assert plt.imread(tmp_path / folder / "landscape.png").shape[0] > 300


def test_center_is_the_adapters_loss_computed_directly(run, tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    argv = ["landscape", str(run / "run"), "--data", str(run / "test.jsonl"), "--grid", "3", "--examples", "6"]
    assert main([*argv, "--batch_size", "6", "--max_length", "2048", "--output", str(tmp_path / "out")]) == 0
    center = json.loads((tmp_path / "out" / "landscape.json").read_text())["losses"][1]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), run / "run" / "adapter")
    rows = gsm8k_rows(6)
    prompts = [f"Question: {r['question']}\nAnswer:" for r in rows]
    enc = tokenizer(
        [p + " " + r["answer"] for p, r in zip(prompts, rows, strict=True)], return_tensors="pt", padding=True
    )
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for i, prompt in enumerate(prompts):  # the loss is on the answers, as SFT trained them
        labels[i, : len(tokenizer(prompt)["input_ids"])] = -100
    assert (labels != -100).sum() > 100
    with torch.no_grad():
        logits = model.eval()(**enc).logits[:, :-1]
    direct = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert center == pytest.approx(float(direct), rel=1e-5)


def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text('{"id": 1}\n[1, 2]\nnot json\n')
    wide = save_tiny_llama(tmp_path / "wide", hidden_size=64)
    cases = [
        (["--data", str(run / "test.jsonl"), "--base", wide], "cannot load"),
        (["--data", str(run / "test.jsonl"), "--grid", "1"], "--grid must be at least 2"),
        (["--data", str(tmp_path / "empty.jsonl")], "no usable rows"),
        (["--data", str(tmp_path / "absent.jsonl")], "is not a file"),
    ]
    for extra, message in cases:
        assert main(["landscape", str(run / "run"), *extra, "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and message in err, err
        assert not (tmp_path / "out").exists()
