"""GLoRA: the layer against its closed form (fp32, NF4), the merge and the LoRA adapter against the adapted
model, the evolutionary search on a fitness with a known optimum, and training through a real SFTTrainer."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import gsm8k_dataset, load_base, logged_losses, logits, lora_config, sft_args
from transformers import TrainerCallback

from lora_over_trl.methods.glora.callback import GloraCallback, search_glora
from lora_over_trl.methods.glora.config import GloraConfig
from lora_over_trl.methods.glora.export import _add_biases, export_glora, export_glora_lora, lora_expressible
from lora_over_trl.methods.glora.model import (
    TENSORS,
    Choice,
    choice_params,
    fix_choices,
    glora_modules,
    install_glora,
    sample_choices,
)
from lora_over_trl.methods.glora.search import evolutionary_search


@pytest.fixture(scope="module")
def biased_llama_dir(tmp_path_factory) -> str:
    """A one-layer Llama whose attention projections have biases (the MLP's do not): both kinds of layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
    )
    path = tmp_path_factory.mktemp("biased_llama")
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # Llama initializes biases to zero, which would hide every term multiplying b0 (D's)
        biases = [module.bias for module in model.modules() if getattr(module, "bias", None) is not None]
        for bias in biases:
            bias.normal_(0.0, 0.1)
    assert biases and all(b.abs().min() > 0 for b in biases)
    model.save_pretrained(path)
    return str(path)


def glora_model(path: str, kind: str = "fp32", ranks=(2, 4), seed: int = 0, **config):
    """A PEFT model whose LoRA layers (r=4) are GLoRA layers, every stored weight drawn at random."""
    from peft import get_peft_model

    model = get_peft_model(load_base(path, kind), lora_config(r=4))
    spaces = install_glora(model, GloraConfig(ranks=list(ranks), **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model, spaces


def dense(option: str, down: torch.Tensor, up: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A support tensor written out element by element's definition: a sum of outer products, a repeated
    column, a constant matrix."""
    down, up = down.detach().double(), up.detach().double()
    if option == "none":
        return torch.zeros(shape, dtype=torch.float64)
    if option.startswith("lora"):
        return sum(torch.outer(down[:, j], up[j]) for j in range(int(option[5:])))
    if option == "vector":
        return down[:, 0:1].expand(shape)
    return torch.full(shape, float(down[0, 0]), dtype=torch.float64)


def bias_vector(option: str, values: torch.Tensor, n: int) -> torch.Tensor:
    if option == "none":
        return torch.zeros(n, dtype=torch.float64)
    values = values.detach().double()[:, 0]
    return values if option == "vector" else torch.full((n,), float(values[0]), dtype=torch.float64)


def expected_output(supernet, x: torch.Tensor) -> torch.Tensor:
    """``x (W0 + W0 (.) A + B)^T + b0 + b0 (.) D + E + W0 C`` in float64, from dense tensors."""
    c = supernet.choice
    w0 = supernet.base_weight().double()
    n_out, n_in = w0.shape
    a = dense(c.A, supernet.a_down, supernet.a_up, (n_out, n_in))
    b = dense(c.B, supernet.b_down, supernet.b_up, (n_out, n_in))
    column = dense(c.C, supernet.c_down, supernet.c_up, (n_in, 1))[:, 0]
    bias = bias_vector(c.E, supernet.e_values, n_out) + w0 @ column
    if supernet.has_bias:
        b0 = supernet.base.bias.double()
        bias = bias + b0 + b0 * bias_vector(c.D, supernet.d_values, n_out)
    return x.double() @ (w0 + w0 * a + b).T + bias


def layer_inputs_outputs(model, input_ids) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    caught = {}
    hooks = [
        layer.register_forward_hook(lambda m, args, out, name=name: caught.__setitem__(name, (args[0], out)))
        for name, layer in glora_modules(model).items()
    ]
    logits(model, input_ids)
    for hook in hooks:
        hook.remove()
    return caught


@pytest.mark.parametrize("kind", ["fp32", "bf16", "nf4"])
def test_every_choice_computes_the_closed_form(biased_llama_dir, kind):
    model, spaces = glora_model(biased_llama_dir, kind)
    input_ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(3))
    rng, seen = random.Random(4), {t: set() for t in TENSORS}
    for _ in range(12):
        choices = sample_choices(spaces, rng)
        fix_choices(model, choices)
        for name, (x, y) in layer_inputs_outputs(model, input_ids).items():
            supernet = glora_modules(model)[name].lora_A["default"]
            expected = expected_output(supernet, x)
            error = (y.double() - expected).abs().max() / expected.abs().max()
            # bf16: the layer's output is rounded to bfloat16 (relative 2^-8)
            assert error < (1e-2 if kind == "bf16" else 1e-5), (name, supernet.choice, float(error))
            for t in TENSORS:
                seen[t].add(getattr(supernet.choice, t))
    assert seen["A"] == {"lora_2", "lora_4", "vector", "scalar", "none"}
    assert seen["D"] == {"vector", "scalar", "none"}  # on the biased attention layers


def _lora_a_only(model) -> tuple[str, torch.nn.Module]:
    fix_choices(model, {n: Choice("lora_4", "none", "none", "none", "none") for n in glora_modules(model)})
    name, layer = next(iter(glora_modules(model).items()))
    return name, layer.lora_A["default"]


def test_4bit_w0_times_a_gradients_match_a_float64_dense_computation(biased_llama_dir):
    """The fused 4-bit path (W0 dequantized inside forward and backward) against autograd on dense float64."""
    model, _ = glora_model(biased_llama_dir, "nf4")
    _, supernet = _lora_a_only(model)
    generator = torch.Generator().manual_seed(21)
    x = torch.randn(2, 5, supernet.in_features, generator=generator, requires_grad=True)
    weights = torch.randn(2, 5, supernet.out_features, generator=generator)
    (supernet(x) * weights).sum().backward()

    w0 = supernet.base_weight().double()
    x64 = x.detach().double().requires_grad_()
    down = supernet.a_down.detach().double().requires_grad_()
    up = supernet.a_up.detach().double().requires_grad_()
    product = x64 @ (w0 * (down[:, :4] @ up[:4])).T
    (product * weights.double()).sum().backward()
    for ours, reference in ((x.grad, x64.grad), (supernet.a_down.grad, down.grad), (supernet.a_up.grad, up.grad)):
        assert reference.abs().max() > 0
        error = (ours.double() - reference).abs().max() / reference.abs().max()
        assert error < 1e-5, float(error)


def test_4bit_path_keeps_nothing_of_weight_size_for_backward(biased_llama_dir):
    """Only x and the rank-k factors are saved: no dense W0, no W0 (.) A between forward and backward."""
    model, _ = glora_model(biased_llama_dir, "nf4")
    _, supernet = _lora_a_only(model)
    saved = []
    x = torch.randn(2, 5, supernet.in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = supernet(x)
    out.sum().backward()
    weight_size = supernet.out_features * supernet.in_features
    assert saved and all(torch.Size(shape).numel() < weight_size for shape in saved), saved
    assert supernet.a_up.grad.abs().sum() > 0


def test_4bit_weights_repacked_for_cpu_inference_still_give_the_closed_form(biased_llama_dir):
    """After bitsandbytes repacked W0 (an eval forward on an AVX512-BF16 CPU) the layer calls the base layer."""
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn.modules import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")

    model, _ = glora_model(biased_llama_dir, "nf4")
    _, supernet = _lora_a_only(model)
    x = torch.randn(3, supernet.in_features, generator=torch.Generator().manual_seed(5))
    a = supernet.a_down.detach().double()[:, :4] @ supernet.a_up.detach().double()[:4]
    expected = x.double() @ (supernet.base_weight().double() * a).T
    weight = supernet.base.weight
    weight.data, weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    with torch.no_grad():
        got = supernet(x)
    error = (got.double() - expected).abs().max() / expected.abs().max()
    assert error < 5e-3, float(error)  # the packed kernel computes in bfloat16


def test_fresh_glora_layers_are_a_no_op(biased_llama_dir):
    from peft import get_peft_model

    base_logits = logits(load_base(biased_llama_dir, "fp32"), torch.arange(1, 12)[None])
    model = get_peft_model(load_base(biased_llama_dir, "fp32"), lora_config(r=4))
    spaces = install_glora(model, GloraConfig())
    for seed in range(3):  # every choice: zero down factors, D and E
        fix_choices(model, sample_choices(spaces, random.Random(seed)))
        assert torch.equal(logits(model, torch.arange(1, 12)[None]), base_logits)


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_merged_folder_loads_in_stock_transformers_and_reproduces_the_adapted_model(
    tiny_llama_dir, biased_llama_dir, tokenizer, kind, tmp_path
):
    from transformers import AutoModelForCausalLM

    input_ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(8))
    for path in (tiny_llama_dir, biased_llama_dir):
        model, spaces = glora_model(path, kind, seed=5)
        choices = sample_choices(spaces, random.Random(9))
        # at least one bias-free MLP layer gains a bias from E, so the merge must switch `mlp_bias` on
        mlp = next(n for n in choices if "mlp" in n)
        choices[mlp] = choices[mlp]._replace(E="vector")
        fix_choices(model, choices)
        adapted = logits(model, input_ids)
        out = export_glora(model, tmp_path / f"merged-{kind}-{len(path)}", tokenizer=tokenizer)
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert merged.config.mlp_bias
        attention_gains = any(c.C != "none" or c.E != "none" for n, c in choices.items() if "self_attn" in n)
        assert merged.config.attention_bias == (attention_gains or path == biased_llama_dir)
        torch.testing.assert_close(logits(merged, input_ids), adapted, rtol=0, atol=1e-5)


def test_a_bias_no_config_switch_can_hold_is_refused(tiny_llama_dir):
    base = load_base(tiny_llama_dir, "fp32")
    with pytest.raises(ValueError, match="no config switch that gives lm_head a bias.*new_biases: false"):
        _add_biases(base, {"lm_head": torch.ones(1000)})


def test_b_only_choices_give_a_standard_peft_lora_adapter(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    model, spaces = glora_model(tiny_llama_dir, seed=2)
    options = ["lora_2", "lora_4", "vector", "scalar", "none"]
    choices = {n: Choice("none", options[i % 5], "none", "none", "none") for i, n in enumerate(spaces)}
    fix_choices(model, choices)
    assert lora_expressible(model) is None
    out = export_glora_lora(model, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and set(config["rank_pattern"].values()) <= {1, 2}
    loaded = PeftModel.from_pretrained(load_base(tiny_llama_dir, "fp32"), out)
    input_ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(1))
    # in float64 the two ways of computing the same function agree far below float32 rounding
    torch.testing.assert_close(logits(loaded.double(), input_ids), logits(model.double(), input_ids), rtol=0, atol=1e-9)

    choices[next(iter(choices))] = Choice("vector", "lora_2", "none", "none", "none")
    fix_choices(model, choices)
    assert "uses A" in lora_expressible(model)
    assert export_glora_lora(model, tmp_path / "not-lora") is None
    assert not (tmp_path / "not-lora").exists()


def test_parameter_count_of_a_choice():
    assert choice_params(Choice("lora_4", "vector", "lora_2", "scalar", "none"), 10, 6) == 4 * 16 + 10 + 2 * 7 + 1
    assert choice_params(Choice("none", "scalar", "vector", "vector", "vector"), 10, 6) == 1 + 6 + 10 + 10


def toy_spaces(n_layers: int = 6) -> dict[str, dict[str, list[str]]]:
    space = {
        "A": ["lora_4", "vector", "scalar", "none"],
        "B": ["lora_4", "vector", "scalar", "none"],
        "C": ["lora_4", "vector", "none"],
        "D": ["vector", "scalar", "none"],
        "E": ["vector", "scalar", "none"],
    }
    return {f"layer{i}": space for i in range(n_layers)}


def test_search_finds_a_known_optimum_within_the_parameter_limit():
    spaces = toy_spaces(4)
    target = sample_choices(spaces, random.Random(0))

    def params(choices):
        return sum(choice_params(c, 10, 6) for c in choices.values())

    limit = params(target) + 20
    scored = []

    def fitness(choices):  # how many support tensors agree with the target: the optimum is unique
        scored.append(params(choices))
        return sum(getattr(c, t) == getattr(target[n], t) for n, c in choices.items() for t in TENSORS)

    config = GloraConfig(seed=1, param_limit=limit)  # the paper's population, generations, top-k, rates
    result = evolutionary_search(spaces, fitness, params, config)
    assert result.choices == target and result.fitness == 20
    assert max(scored) <= limit and len(scored) == result.evaluations
    best = [h["best_fitness"] for h in result.history]
    assert len(best) == 20 and best == sorted(best)  # the best so far never gets worse
    draws = [sample_choices(spaces, random.Random(10**6 + s)) for s in range(result.evaluations)]
    assert max(map(fitness, draws)) < 20  # as many random draws do not find it
    again = evolutionary_search(spaces, fitness, params, config)
    assert again.choices == result.choices and again.history == result.history  # seeded


def test_search_reports_a_limit_no_candidate_meets():
    with pytest.raises(ValueError, match="param_limit"):
        evolutionary_search(toy_spaces(), lambda c: 0.0, lambda c: 100, GloraConfig(param_limit=5))


class RecordChoices(TrainerCallback):
    def __init__(self, layers):
        self.layers, self.drawn = layers, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.drawn.append(tuple(layer.lora_A["default"].choice for layer in self.layers.values()))


def glora_trainer(base_dir, tokenizer, out, config, kind="fp32", **overrides):
    from trl import SFTTrainer

    from lora_over_trl import keep_cpu_4bit_layout

    data = gsm8k_dataset(40)
    model = load_base(base_dir, kind)
    if kind == "nf4":  # the search scores in eval mode, where bitsandbytes would repack the weights on CPU
        keep_cpu_4bit_layout(model)
    return SFTTrainer(
        model=model,
        args=sft_args(out, **overrides),
        train_dataset=data.select(range(32)),
        eval_dataset=data.select(range(32, 40)),
        processing_class=tokenizer,
        peft_config=lora_config(r=4),
        callbacks=[GloraCallback(config)],
    )


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_supernet_trains_then_search_and_merge(tiny_llama_dir, tokenizer, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    search = dict(population=8, generations=4, top_k=3, mutation_count=3, crossover_count=3, search_batches=2)
    trainer = glora_trainer(tiny_llama_dir, tokenizer, tmp_path / "run", GloraConfig(ranks=[2, 4], **search), kind)
    layers = glora_modules(trainer.model)
    recorder = RecordChoices(layers)
    trainer.add_callback(recorder)  # after GloraCallback: sees each step's draw
    trainer.train()
    assert len(recorder.drawn) == 10 and len(set(recorder.drawn)) == 10  # a new draw every step
    assert all(torch.isfinite(torch.tensor(v)) for v in logged_losses(trainer).values())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    stored = [p for layer in layers.values() for p in layer.lora_A["default"].parameters()]
    assert all(id(p) in optimized for p in stored)
    assert all(layer.lora_A["default"].b_down.dtype == torch.float32 for layer in layers.values())
    assert sum(float(layer.lora_A["default"].b_down.detach().abs().sum()) for layer in layers.values()) > 0

    generations = []
    result = search_glora(trainer, output_dir=tmp_path / "run", progress=generations.append)
    assert len(generations) == 4 and result.evaluations >= 8
    record = json.loads((tmp_path / "run" / "glora_search.json").read_text())
    assert record["choices"] == {n: c._asdict() for n, c in result.choices.items()}
    assert [h["best_fitness"] for h in record["history"]] == [g["best_fitness"] for g in generations]
    assert all(layer.lora_A["default"].choice == result.choices[n] for n, layer in layers.items())
    # the chosen configuration's held-out loss, summed over target tokens by hand, is the reported fitness
    total, count = 0.0, 0
    trainer.model.eval()
    with torch.no_grad():
        for index, batch in enumerate(trainer.get_eval_dataloader()):
            if index == 2:  # search_batches
                break
            out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            targets = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100, reduction="sum"
            )
            total, count = total + float(losses), count + int((targets != -100).sum())
    trainer.model.train()
    assert -result.fitness == pytest.approx(total / count, rel=1e-5)
    input_ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(2))
    adapted = logits(trainer.model, input_ids)
    merged = AutoModelForCausalLM.from_pretrained(export_glora(trainer.model, tmp_path / "merged"))
    torch.testing.assert_close(logits(merged, input_ids), adapted, rtol=0, atol=1e-5)


def test_resume_draws_and_trains_as_the_uninterrupted_run(tiny_llama_dir, tokenizer, tmp_path):
    config = GloraConfig(seed=3)
    full = glora_trainer(tiny_llama_dir, tokenizer, tmp_path / "full", config)
    full.train()
    from safetensors import safe_open

    with safe_open(tmp_path / "full" / "checkpoint-4" / "adapter_model.safetensors", "pt") as saved:
        keys = set(saved.keys())
    for part in ("a_down", "a_up", "b_down", "b_up", "c_down", "c_up", "d_values", "e_values"):
        assert f"base_model.model.model.layers.0.mlp.up_proj.lora_A.{part}" in keys  # PEFT saves every weight
    resumed = glora_trainer(tiny_llama_dir, tokenizer, tmp_path / "resumed", GloraConfig(seed=3))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    expected, got = logged_losses(full), logged_losses(resumed)
    for step in range(5, 11):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_ranks_above_the_stored_rank_are_refused(tiny_llama_dir, tokenizer, tmp_path):
    from lora_over_trl.utils.callbacks import ScheduleSetupError

    with pytest.raises(ScheduleSetupError, match="glora.ranks: 8 exceeds the LoRA r \\(4\\)"):
        glora_trainer(tiny_llama_dir, tokenizer, tmp_path / "x", GloraConfig(ranks=[2, 8]))


def test_config_errors_name_every_bad_field():
    with pytest.raises(ValueError) as err:
        GloraConfig(ranks=[0], top_k=60, mutation_prob=1.5, param_limit=-1)
    message = str(err.value)
    for field in ("ranks", "top_k", "mutation_prob", "param_limit"):
        assert f"`{field}`" in message
    with pytest.raises(ValueError, match="did you mean 'population'"):
        GloraConfig.from_dict({"populaton": 10})


def test_search_fitness_on_a_classifier_keeps_token_type_ids_and_weights_examples(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from lora_over_trl.methods.glora.callback import held_out_fitness

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    lora = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(BertForSequenceClassification(config), lora)
    rows = [
        {"input_ids": [1, 5 + i, 7, 9 + i, 2], "token_type_ids": [0, 0, 0, 1, 1], "labels": i % 2} for i in range(6)
    ]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_eval_batch_size=1, report_to=[])
    trainer = Trainer(
        model=model, args=args, eval_dataset=Dataset.from_list(rows), callbacks=[GloraCallback(GloraConfig())]
    )
    spaces = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GloraCallback)).spaces
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.normal_(0, 0.1)
    choices = sample_choices(spaces, random.Random(0))
    fitness = held_out_fitness(trainer, batches=6)(choices)
    model.eval()
    with torch.no_grad():
        losses = [
            float(
                model(
                    **{k: torch.tensor([v]) for k, v in row.items() if k != "labels"},
                    labels=torch.tensor([row["labels"]]),
                ).loss
            )
            for row in rows
        ]
    assert -fitness == pytest.approx(sum(losses) / len(losses), rel=1e-6)  # batch 1: each example weighs one
