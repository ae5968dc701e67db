"""The GPU path: every method on a tiny Llama in bitsandbytes 4-bit NF4 on CUDA with bfloat16 compute and
activation checkpointing, trained through transformers' ``Trainer`` (TRL's ``SFTTrainer`` is its subclass; TRL
itself needs pyarrow, which a bare GPU machine may lack, so the one SFT-command test skips without it).

Skipped without CUDA. ``LORA_OVER_GPU_TESTS_ON_CPU=1`` runs them on CPU instead (same code, bf16 compute on
the CPU 4-bit kernels) to check the tests themselves on a machine without a GPU; the numbers they assert are the
GPU's to meet. ``make gpu-check`` runs them on a GPU machine (docs/gpu.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama, train_tokenizer

ON_CPU = os.environ.get("LORA_OVER_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if ON_CPU else None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device (LORA_OVER_GPU_TESTS_ON_CPU=1: run on CPU)"),
]
ROOT = Path(__file__).resolve().parents[2]
# Word problems shipped in the tree (GSM8K's fields and style): a GPU machine has only the tree and what is carried.
PROBLEMS = ROOT / "recipes" / "data" / "arithmetic" / "train.jsonl"


def problems(n: int) -> list[dict]:
    with PROBLEMS.open() as handle:
        return [json.loads(line) for _, line in zip(range(n), handle, strict=False)]


@pytest.fixture(scope="module")
def tokenizer():
    """conftest's byte-level BPE tokenizer, trained on the shipped word problems."""
    return train_tokenizer(problems(2000))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def load_nf4(path: str, compute: torch.dtype = torch.bfloat16):
    """The base in 4-bit NF4 on DEVICE with bfloat16 compute, as QLoRA users load it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute, device_map={"": DEVICE})


def peft_model(path: str, seed: int = 0, compute: torch.dtype = torch.bfloat16):
    """QLoRA as TRL prepares it: k-bit preparation (input gradients for checkpointing), LoRA r=8 everywhere."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(seed)
    base = prepare_model_for_kbit_training(load_nf4(path, compute), use_gradient_checkpointing=True)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def rows(tokenizer, n: int = 32) -> list[dict]:
    """Word problems, tokenized (a plain list: no datasets package needed)."""
    return [tokenizer(r["question"] + "\n" + r["answer"], truncation=True, max_length=96) for r in problems(n)]


def make_trainer(path: str, tokenizer, out: Path, callback, *, seed: int = 0, **overrides):
    """transformers' Trainer: bf16 autocast, activation checkpointing, AdamW, checkpoints every 4 steps."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    values = dict(
        output_dir=str(out), use_cpu=DEVICE == "cpu", bf16=True, max_steps=8, per_device_train_batch_size=2,
        learning_rate=5e-3, logging_steps=1, save_steps=4, report_to=[], seed=7, activation_checkpointing=True,
        optim="adamw_torch", adam_epsilon=1e-3, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    values.update(overrides)
    return Trainer(
        model=peft_model(path, seed),
        args=TrainingArguments(**values),
        train_dataset=rows(tokenizer),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[callback] if callback is not None else [],
    )


def batch(tokenizer):
    enc = tokenizer([r["question"] for r in problems(4)], return_tensors="pt", padding=True)
    return enc["input_ids"].to(DEVICE), enc["attention_mask"].to(DEVICE)


def logits_of(model, ids, mask) -> torch.Tensor:
    model.train()  # the same mode on CPU and GPU (CPU eval-mode forwards repack 4-bit weights: README)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        return model(input_ids=ids, attention_mask=mask).logits.float()


def assert_stock_peft_reproduces(model, path: str, tokenizer, out: Path) -> None:
    """Save the collapsed adapter; stock PEFT on a freshly loaded NF4 base gives the same logits."""
    from peft import PeftModel, prepare_model_for_kbit_training

    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not any(k.startswith("lora_over") for k in config)
    ids, mask = batch(tokenizer)
    expected = logits_of(model, ids, mask)
    # the base as the trained model holds it (norms and embeddings in float32), so only the adapter differs
    base = prepare_model_for_kbit_training(load_nf4(path), use_gradient_checkpointing=True)
    reloaded = PeftModel.from_pretrained(base, out)
    got = logits_of(reloaded, ids, mask)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-3 * scale, float((got - expected).abs().max() / scale)


def assert_on_device(model, optimizer=None) -> None:
    """Every parameter, buffer and optimizer state of the model on DEVICE: nothing silently left on CPU."""
    where = {name: t.device.type for name, t in [*model.named_parameters(), *model.named_buffers()]}
    stray = {name: kind for name, kind in where.items() if kind != DEVICE}
    assert not stray, list(stray.items())[:5]
    for state in optimizer.state.values() if optimizer is not None else []:
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.device.type == DEVICE, value.shape


def test_lora_over_static_trains_collapses_exactly_and_reloads_in_stock_peft(base_dir, tokenizer, tmp_path):
    from lora_over_trl import LoraOverCallback, LoraOverConfig, over_parameterized_factors

    callback = LoraOverCallback(LoraOverConfig(capacity=1.0))
    trainer = make_trainer(base_dir, tokenizer, tmp_path / "run", callback, save_steps=100)
    seen = {}

    class Probe(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:  # mid-run: over-parameterized, every tensor where the layer is
                factors = over_parameterized_factors(model)
                seen["factors"] = len(factors)
                assert_on_device(model, trainer.optimizer)
                seen["ok"] = True

    trainer.add_callback(Probe())
    trainer.train()
    assert seen == {"factors": seen["factors"], "ok": True} and seen["factors"] > 0
    collapse = [h for h in callback.history if h["event"] == "collapse"][-1]
    assert collapse["max_error"] <= 1e-6, collapse
    assert not over_parameterized_factors(trainer.model)
    assert_on_device(trainer.model)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert_stock_peft_reproduces(trainer.model, base_dir, tokenizer, tmp_path / "adapter")


def test_dynamic_schedule_reallocates_on_device_and_resumes_as_the_uninterrupted_run(base_dir, tokenizer, tmp_path):
    from peft import get_peft_model_state_dict

    from lora_over_trl import LoraOverCallback, LoraOverConfig

    def config():
        return LoraOverConfig(capacity=1.0, schedule="dynamic", budget_ratio=0.3, interval=2, warmup_steps=2)

    full_callback = LoraOverCallback(config())
    full = make_trainer(base_dir, tokenizer, tmp_path / "full", full_callback)
    full.train()
    moves = [h for h in full_callback.history if h["event"] == "reallocate"]
    assert moves and any(h["leaving"] or h["entering"] for h in moves), full_callback.history
    resumed = make_trainer(base_dir, tokenizer, tmp_path / "resumed", LoraOverCallback(config()))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert_on_device(resumed.model)
    ours, theirs = (get_peft_model_state_dict(t.model) for t in (resumed, full))
    assert ours.keys() == theirs.keys()
    for key in ours:
        scale = theirs[key].abs().max()
        assert (ours[key] - theirs[key]).abs().max() <= 1e-3 * scale, key


@pytest.mark.parametrize("method", ["cla", "c3la"])
def test_cla_family_trains_collapses_and_reloads(base_dir, tokenizer, tmp_path, method):
    from lora_over_trl import ClaCallback, ClaConfig

    callback = ClaCallback(ClaConfig(method=method, chain_interval=4))
    trainer = make_trainer(base_dir, tokenizer, tmp_path / "run", callback, save_steps=100)
    trainer.train()
    assert_on_device(trainer.model)
    assert callback.rank is not None and (method == "cla" or callback.position >= 1)  # chained, then collapsed
    assert_stock_peft_reproduces(trainer.model, base_dir, tokenizer, tmp_path / "adapter")


def test_glora_fused_4bit_gradients_match_float64_autograd_on_the_dequantized_weight(base_dir):
    from lora_over_trl.methods.glora.config import GloraConfig
    from lora_over_trl.methods.glora.model import Choice, fix_choices, glora_modules, install_glora

    model = peft_model(base_dir, compute=torch.float32)  # float32 compute: the fused kernels' own precision
    install_glora(model, GloraConfig(ranks=[2, 4]))
    fix_choices(model, {n: Choice("lora_4", "none", "none", "none", "none") for n in glora_modules(model)})
    supernet = next(iter(glora_modules(model).values())).lora_A["default"]
    generator = torch.Generator().manual_seed(21)
    with torch.no_grad():
        supernet.a_down.copy_(0.1 * torch.randn(supernet.a_down.shape, generator=generator))
    x = torch.randn(2, 5, supernet.in_features, generator=generator).to(DEVICE).requires_grad_()
    weights = torch.randn(2, 5, supernet.out_features, generator=generator).to(DEVICE)
    assert supernet.a_down.device.type == DEVICE
    (supernet(x).float() * weights).sum().backward()

    w0 = supernet.base_weight().double().cpu()
    x64 = x.detach().double().cpu().requires_grad_()
    down = supernet.a_down.detach().double().cpu().requires_grad_()
    up = supernet.a_up.detach().double().cpu().requires_grad_()
    ((x64 @ (w0 * (down[:, :4] @ up[:4])).T) * weights.double().cpu()).sum().backward()
    for ours, reference in ((x.grad, x64.grad), (supernet.a_down.grad, down.grad), (supernet.a_up.grad, up.grad)):
        assert reference.abs().max() > 0
        error = (ours.double().cpu() - reference).abs().max() / reference.abs().max()
        assert error < 1e-5, float(error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_banked_factors_contract_on_device_as_a_float64_reference(base_dir, dtype):
    """The factor bank's batched contraction (what every forward uses) on DEVICE, with random cores, against an
    independent float64 contraction of each factor's cores; adapters in float32 and in bfloat16 (as TRL trains
    them on a 4-bit base)."""
    from conftest import reference_contract

    from lora_over_trl import LoraOverConfig, apply_lora_over, over_parameterized_factors

    model = peft_model(base_dir)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
    apply_lora_over(model, LoraOverConfig(capacity=1.0, rules=[{"target_modules": ["q_proj"], "capacity": 4.0}]))
    factors = over_parameterized_factors(model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for factor in factors.values():
            for core in factor.cores:
                core.copy_(0.5 * torch.randn(core.shape, generator=generator))
    assert_on_device(model)
    for key, factor in factors.items():
        weight = factor.bank.linears[key].weight  # the banked linear's weight: its slice of the batched contraction
        assert weight.device.type == DEVICE and weight.dtype == dtype
        expected = reference_contract(factor.effective_cores())
        error = abs(weight.detach().double().cpu().numpy() - expected).max() / abs(expected).max()
        assert error < (1e-5 if dtype == torch.float32 else 2e-2), (key, error)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL (needs pyarrow, pandas) not on this machine")
def test_sft_command_on_the_device_keeps_bitsandbytes_gpu_layout_and_writes_an_adapter(base_dir, tmp_path):
    """The SFT command as users launch it, QLoRA with bf16 on CUDA: the CPU-only 4-bit workaround is not applied
    there, the model sits on the device, and the run writes a standard adapter."""
    import bitsandbytes as bnb
    from trl import ModelConfig, SFTConfig

    from lora_over_trl.sft.trainer import load_model_and_tokenizer

    train_tokenizer(problems(2000)).save_pretrained(base_dir)
    model_args = ModelConfig(
        model_name_or_path=base_dir, load_in_4bit=True, bnb_4bit_quant_type="nf4", dtype="bfloat16"
    )
    training_args = SFTConfig(output_dir=str(tmp_path / "x"), use_cpu=DEVICE == "cpu")
    model, _ = load_model_and_tokenizer(model_args, training_args)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    default = bnb.nn.Linear4bit(8, 8).support_avx512bf16_for_cpu
    assert layers and all(m.support_avx512bf16_for_cpu == default for m in layers) or DEVICE == "cpu"
    assert_on_device(model)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in problems(32)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {base_dir}\nload_in_4bit: true\nbnb_4bit_quant_type: nf4\ndtype: bfloat16\n"
        f"lora_r: 8\nlora_alpha: 16\nlora_target_modules: all-linear\ndataset_name: {data}\n"
        'dataset_columns:\n  prompt: "Question: {question}\\nAnswer:"\n  completion: " {answer}"\n'
        f"max_length: 128\noutput_dir: {tmp_path / 'out'}\nbf16: true\nuse_cpu: {str(DEVICE == 'cpu').lower()}\n"
        "max_steps: 4\nper_device_train_batch_size: 2\nlearning_rate: 1.0e-3\nsave_steps: 4\nreport_to: []\n"
        "activation_checkpointing: true\nlora_over:\n  capacity: 1.0\n"
    )
    done = subprocess.run([sys.executable, "-m", "lora_over_trl.sft", str(recipe)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
