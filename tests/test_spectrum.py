"""Spectral analysis of LoRA updates: numbers against hand-built updates and direct computations; the command."""

from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import pytest
import torch
from conftest import make_peft, save_tiny_llama
from safetensors.torch import load_file

from lora_over_trl.analyze.command import main
from lora_over_trl.analyze.spectrum import effective_rank, module_spectrum, stable_rank, update_singular_values


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


def test_hand_built_update_has_the_singular_values_and_ranks_it_was_built_with():
    generator = torch.Generator().manual_seed(11)
    u, v = orthonormal(48, 4, generator), orthonormal(40, 4, generator)
    sigma = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    b, a = u * sigma, v.T  # B A = U diag(sigma) V^T
    assert torch.allclose(update_singular_values(b, a, 2.0), 2 * sigma, rtol=1e-12)
    result = module_spectrum("m", b, a, 2.0)
    p = sigma / sigma.sum()
    assert result.rank == 4
    assert result.effective_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-12)
    assert result.stable_rank == pytest.approx((64 + 16 + 4 + 1) / 64, rel=1e-12)
    assert result.alignment is None and result.intruders is None


def test_small_and_zero_updates():
    """Singular values below 1 (every real LoRA update's scale), and the zero update of a fresh PEFT adapter."""
    half = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    assert effective_rank(half) == pytest.approx(2.0, rel=1e-12)  # two equal values, a zero one ignored
    assert stable_rank(torch.tensor([0.5, 0.25], dtype=torch.float64)) == pytest.approx(1.25, rel=1e-12)
    for none in (torch.zeros(3, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)):
        assert effective_rank(none) == 0.0 and stable_rank(none) == 0.0
    base = torch.diag(torch.linspace(3, 1, 6, dtype=torch.float64))
    b, a = torch.zeros(6, 2, dtype=torch.float64), torch.ones(2, 6, dtype=torch.float64)
    zero = module_spectrum("m", b, a, 1.0, base)
    assert (zero.rank, zero.effective_rank, zero.stable_rank, zero.alignment, zero.intruders) == (0, 0.0, 0.0, 0.0, 0)
    small = module_spectrum("m", 0.01 * torch.eye(6, 1, dtype=torch.float64), torch.eye(1, 6, dtype=torch.float64), 1.0)
    assert small.rank == 1 and small.singular_values == pytest.approx([0.01], rel=1e-12)
    empty = module_spectrum("m", torch.zeros(6, 0, dtype=torch.float64), torch.zeros(0, 6, dtype=torch.float64), 1.0)
    assert (empty.rank, empty.singular_values, empty.effective_rank, empty.stable_rank) == (0, [], 0.0, 0.0)


def test_intruder_and_alignment_on_a_known_base():
    m, n = 48, 40
    base = torch.zeros(m, n, dtype=torch.float64)
    base[torch.arange(n), torch.arange(n)] = torch.linspace(10, 1, n, dtype=torch.float64)  # U0 = e_1 .. e_40
    outside = torch.zeros(m, 1, dtype=torch.float64)
    outside[n:] = 1 / math.sqrt(m - n)  # orthogonal to every left singular vector of W0
    right = torch.zeros(1, n, dtype=torch.float64)
    right[0, 5] = 1.0
    intruding = module_spectrum("m", outside * 30.0, right, 1.0, base, top_k=10)
    assert intruding.intruders == 1 and intruding.alignment == pytest.approx(0.0, abs=1e-12)
    inside = torch.zeros(m, 1, dtype=torch.float64)
    inside[0] = 1.0
    first = torch.zeros(1, n, dtype=torch.float64)
    first[0, 0] = 1.0
    aligned = module_spectrum("m", inside * 3.0, first, 1.0, base, top_k=10)
    assert aligned.intruders == 0 and aligned.alignment == pytest.approx(1.0, rel=1e-12)
    small = module_spectrum("m", inside * 0.5, first, 1.0, base, top_k=10)  # energy 0.25: still a share of it
    assert small.alignment == pytest.approx(1.0, rel=1e-12)
    # the default top_k is 10: an update along W0's 11th direction is outside it
    eleventh, column = torch.zeros(m, 1, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)
    eleventh[10], column[0, 10] = 0.1, 1.0
    assert module_spectrum("m", eleventh, column, 1.0, base).alignment == pytest.approx(0.0, abs=1e-12)
    assert module_spectrum("m", eleventh, column, 1.0, base, top_k=11).alignment == pytest.approx(1.0, rel=1e-12)
    # top_k beyond W0's rank (40 < 48 rows) counts only W0's 40 directions, not the 8 it does not span
    assert module_spectrum("m", outside * 30.0, right, 1.0, base, top_k=45).alignment == pytest.approx(0.0, abs=1e-12)
    # the sign of the update matters: half along e_1, half outside, against W0's top value 10; adding it keeps a
    # mostly-e_1 top vector (20 e_1 + 10 w, similarity 0.89), subtracting it cancels e_1 and leaves w on top
    mixed = inside / math.sqrt(2) + outside / math.sqrt(2)
    assert module_spectrum("m", mixed * 10 * math.sqrt(2), first, 1.0, base).intruders == 0
    assert module_spectrum("m", mixed * -10 * math.sqrt(2), first, 1.0, base).intruders == 1


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny base and two PEFT LoRA adapters with fresh random (non-zero) B and A."""
    root = tmp_path_factory.mktemp("spectrum")
    base = save_tiny_llama(root / "base")
    folders = []
    for seed in (1, 2):
        model = make_peft(base, "fp32", seed=seed, init_lora_weights=False)
        model.save_pretrained(root / f"run{seed}" / "adapter")
        folders.append(root / f"run{seed}")
    return base, folders


def test_command_matches_a_direct_computation_and_draws(adapters, tmp_path, capsys):
    base, (run, other) = adapters
    assert main(["spectrum", str(run), "--vs", str(other), "--output", str(tmp_path / "out")]) == 0
    reports = json.loads((tmp_path / "out" / "spectrum.json").read_text())
    assert len(reports) == 2 and len(reports[0]["modules"]) == 14  # 2 layers x 7 linear modules
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    base_weights = load_file(f"{base}/model.safetensors")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    for entry in reports[0]["modules"]:
        key = f"base_model.model.{entry['module']}"
        delta = scaling * weights[f"{key}.lora_B.weight"].double() @ weights[f"{key}.lora_A.weight"].double()
        direct = torch.linalg.svdvals(delta)[: config["r"]]
        assert torch.allclose(torch.tensor(entry["singular_values"], dtype=torch.float64), direct, rtol=1e-9)
        w0 = base_weights[f"{entry['module']}.weight"].double()
        u0, _, v0h = torch.linalg.svd(w0, full_matrices=False)
        projected = u0[:, :10].T @ delta @ v0h[:10].T
        assert entry["alignment"] == pytest.approx(float((projected**2).sum() / (delta**2).sum()), rel=1e-9)
        assert entry["rank"] == config["r"] and 1 <= entry["effective_rank"] <= config["r"]
    assert "| model.layers.0.self_attn.q_proj |" in capsys.readouterr().out
    for picture in ("spectra.png", "effective_rank.png"):
        image = plt.imread(tmp_path / "out" / picture)
        assert image.shape[1] > 600 and len({tuple(px) for px in image.reshape(-1, image.shape[-1])[:, :3]}) > 8


def test_4bit_base_changes_what_the_update_is_compared_with(adapters, tmp_path):
    _, (run, _) = adapters
    args = ["spectrum", str(run), "--modules", "q_proj"]
    assert main([*args, "--output", str(tmp_path / "plain")]) == 0
    assert main([*args, "--load_in_4bit", "--output", str(tmp_path / "nf4")]) == 0
    plain, nf4 = (json.loads((tmp_path / d / "spectrum.json").read_text())[0]["modules"] for d in ("plain", "nf4"))
    assert [m["module"] for m in plain] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert [m["singular_values"] for m in plain] == [m["singular_values"] for m in nf4]  # the update is the same
    assert [m["alignment"] for m in plain] != [m["alignment"] for m in nf4]  # the base it is compared with is not


def test_bad_input_is_one_line_and_exit_2(adapters, tmp_path, capsys):
    base, (run, _) = adapters
    other_base = save_tiny_llama(tmp_path / "wide", hidden_size=64)
    capsys.readouterr()  # its progress bar
    cases = [
        (["spectrum", str(tmp_path / "absent")], "does not exist"),
        (["spectrum", str(tmp_path)], "no adapter_config.json"),
        (["spectrum", str(run), "--base", str(tmp_path / "nowhere")], "not a local folder and not available"),
        (["spectrum", str(run), "--base", other_base], "does not match the adapter"),
        (["spectrum", str(run), "--modules", "nothing_like_this"], "no LoRA module matches"),
    ]
    for argv, message in cases:
        assert main([*argv, "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
