"""LoraOverCallback through a real TRL SFTTrainer on tiny Llamas: static and dynamic schedules, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import (
    free_port,
    gsm8k_dataset,
    load_base,
    logged_losses,
    logits,
    lora_config,
    make_peft,
    make_sft_trainer,
    reference_contract,
    sft_args,
)
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import SFTTrainer

from lora_over_trl import LoraOverCallback, LoraOverConfig
from lora_over_trl.lora_over.callback import HISTORY_FILE, PICTURE_FILE, SCHEDULER_FILE
from lora_over_trl.lora_over.checkpoint import LAYOUT_FILE
from lora_over_trl.lora_over.model import banks, over_parameterized_factors
from lora_over_trl.lora_over.schedule.allocate import module_type
from lora_over_trl.lora_over.schedule.picture import allocation_matrix


def make_trainer(tiny_llama_dir, tokenizer, out, config, kind="fp32", **overrides):
    return make_sft_trainer(tiny_llama_dir, tokenizer, out, LoraOverCallback(config), kind, **overrides)


losses = logged_losses


class StorageProbe(TrainerCallback):
    """The bank's storage (object, data pointer, size) when training starts and after every step, once the schedule
    has re-allocated: what DDP's buckets and FSDP2's shards hold on to must never be replaced or resized."""

    def __init__(self, trainer) -> None:
        self.callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LoraOverCallback))
        self.seen: list[tuple[int, int, int]] = []
        self.trainer = trainer
        trainer.callback_handler.callbacks.append(self)  # after LoraOverCallback: sees its moves

    def look(self, *args, **kwargs) -> None:
        (bank,) = banks(self.callback.model).values()
        self.seen.append((id(bank.storage), bank.storage.data_ptr(), bank.storage.numel()))

    on_train_begin = on_step_end = look

    def check(self) -> None:
        assert len(self.seen) == self.trainer.state.global_step + 1 > 2 and len(set(self.seen)) == 1, self.seen
        if self.callback.config.schedule != "static":  # reserved once: the LoRA weights plus the budget
            assert self.seen[0][2] == self.callback.scheduler.reserve


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_static_schedule_trains_and_saves_a_standard_adapter(tiny_llama_dir, tokenizer, gsm8k_batch, tmp_path, kind):
    """The shipped recipes' setting (4-bit base, bfloat16 adapter weights from TRL, ``aux_lr``): the saved adapter,
    reloaded by stock PEFT on a fresh base, gives the trained model's logits, and the collapse error the run
    reports matches one computed independently from the trained cores."""
    from peft import PeftModel

    config = LoraOverConfig(capacity=1.0, rules=[{"target_modules": ["q_proj"], "capacity": 2.0}], aux_lr=2e-2)
    trainer = make_trainer(tiny_llama_dir, tokenizer, tmp_path / "run", config, kind, max_steps=5)
    factors = over_parameterized_factors(trainer.model)
    assert len(factors) == 28  # installed before the optimizer exists ...
    assert {f.aux_scale for f in factors.values()} == {2e-2 / 5e-3}  # aux_lr / learning_rate
    optimized = {id(p) for g in trainer.create_optimizer().param_groups for p in g["params"]}
    assert all(id(b.storage) in optimized for b in banks(trainer.model).values())  # ... so the cores train
    if kind == "nf4":
        assert {b.storage.dtype for b in banks(trainer.model).values()} == {torch.bfloat16}
    seen = {}

    class BeforeCollapse(TrainerCallback):  # runs before LoraOverCallback's on_train_end
        def on_train_end(self, args, state, control, model=None, **kwargs):
            seen["logits"] = logits(model, *gsm8k_batch)
            current = over_parameterized_factors(model)
            seen["ba"] = {
                name: reference_contract(current[f"{name}.lora_B"].effective_cores())
                @ reference_contract(current[f"{name}.lora_A"].effective_cores())
                for name in {k.rsplit(".", 1)[0] for k in current}
            }

    trainer.callback_handler.callbacks.insert(0, BeforeCollapse())
    probe = StorageProbe(trainer)
    trainer.train()
    probe.check()
    assert all(torch.isfinite(torch.tensor(list(losses(trainer).values()))))
    assert (tmp_path / "run" / "checkpoint-4" / LAYOUT_FILE).is_file()
    assert not over_parameterized_factors(trainer.model)  # collapsed at on_train_end
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert saved and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in saved)

    # the error the run reports, against B A from the trained cores (float64, numpy) and the saved weights
    prefix = "base_model.model."
    independent = max(
        np.linalg.norm(saved[f"{prefix}{n}.lora_B.weight"].double().numpy() @ saved[f"{prefix}{n}.lora_A.weight"]
                       .double().numpy() - ba) / np.linalg.norm(ba)
        for n, ba in seen["ba"].items()
    )  # fmt: skip
    reported = next(h for h in json.loads((tmp_path / "run" / HISTORY_FILE).read_text()) if h["event"] == "collapse")
    assert independent <= 1e-6 and reported["max_error"] <= 1e-6
    assert reported["max_error"] == pytest.approx(independent, abs=2e-7)

    stock = PeftModel.from_pretrained(load_base(tiny_llama_dir, kind), str(tmp_path / "final"))
    reloaded, base = logits(stock, *gsm8k_batch), logits(load_base(tiny_llama_dir, kind), *gsm8k_batch)
    moved = (seen["logits"] - base).abs().max()
    # the trained forward contracts in the bank's dtype (bfloat16 under TRL on a 4-bit base); the saved weights
    # are the float64 contraction in float32: they differ by the forward's own rounding, no more
    tolerance = 1e-5 if kind == "fp32" else 2e-2 * moved
    assert moved > 0.05 and (reloaded - seen["logits"]).abs().max() <= tolerance


@pytest.mark.parametrize(
    "kind, accumulation, levels", [("fp32", 1, 1), ("fp32", 2, 1), ("nf4", 1, 1), ("fp32", 1, 3), ("nf4", 2, 3)]
)
def test_dynamic_schedule_keeps_budget_and_optimizer_consistent(
    tiny_llama_dir, tokenizer, gsm8k_batch, tmp_path, kind, accumulation, levels
):
    config = LoraOverConfig(
        capacity=1.0,
        schedule="dynamic",
        budget_ratio=0.3,
        interval=2,
        warmup_steps=2,
        final_steps=0,  # re-allocate up to the last step (the default keeps the last 20% fixed)
        collapse_on_train_end=False,
        levels=levels,
        aux_lr=2e-2 if kind == "nf4" else None,  # the shipped Llama-3 recipes' setting
    )
    trainer = make_trainer(
        tiny_llama_dir,
        tokenizer,
        tmp_path / "run",
        config,
        kind,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=0.5,
    )
    probe = StorageProbe(trainer)
    trainer.train()
    probe.check()
    history = json.loads((tmp_path / "run" / HISTORY_FILE).read_text())
    realloc = [h for h in history if h["event"] == "reallocate"]
    assert [h["step"] for h in realloc] == [2, 4, 6, 8]
    assert all(0 < h["aux_params"] <= h["budget"] for h in history)
    assert any(h["leaving"] or h["entering"] for h in realloc)  # the scheduler moved capacity
    if levels > 1:  # modules held different capacities, and some moved between levels (SVD error logged)
        assert any(len(set(h["capacities"].values())) > 1 for h in history)
        assert {c for h in history for c in h["capacities"].values()} <= {1 / 3, 2 / 3, 1.0}
        errors = [e for h in realloc for e in h["resized"].values()]
        assert errors and all(0.0 <= e < 1.0 for e in errors)
    picture = plt.imread(tmp_path / "run" / PICTURE_FILE)
    modules, steps, rows = allocation_matrix(history)
    assert steps == [0, 2, 4, 6, 8] and picture.shape[0] > 200 and picture.shape[1] > 200  # optimizer steps
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LoraOverCallback))
    assert callback.tracker.updates == 10  # one sensitivity update per optimizer step, micro-batches summed
    assert {tuple(r) for r in rows} != {tuple(rows[0])}  # modules differ in when they held capacity
    assert len({tuple(px) for px in picture.reshape(-1, picture.shape[-1])[:, :3].round(2)}) > 4  # not blank
    model_order = [p for p in trainer.model.parameters() if p.requires_grad]
    held = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert sorted(map(id, held)) == sorted(map(id, model_order))  # exactly the trainable parameters
    for group in trainer.optimizer.param_groups:
        index = [next(i for i, q in enumerate(model_order) if q is p) for p in group["params"]]
        assert index == sorted(index)  # in model order: a resumed run's optimizer loads positionally

    # After the moves, the collapsed adapter reloaded in stock PEFT is the function that was trained.
    from peft import PeftModel

    from lora_over_trl import collapse

    trained = logits(trainer.model, *gsm8k_batch)
    assert max(collapse(trainer.model, dtype=torch.float32).values()) <= 1e-6  # as the callback collapses
    trainer.model.save_pretrained(tmp_path / "final")
    stock = logits(PeftModel.from_pretrained(load_base(tiny_llama_dir, kind), tmp_path / "final"), *gsm8k_batch)
    moved = (trained - logits(load_base(tiny_llama_dir, kind), *gsm8k_batch)).abs().max()
    tolerance = 1e-5 if kind == "fp32" else 2e-2 * moved  # bfloat16 forward against float32 weights, as above
    assert moved > 0.05 and (stock - trained).abs().max() <= tolerance


def test_dynamic_sensitivity_is_w_times_the_steps_summed_gradient(tiny_llama_dir, tokenizer, tmp_path):
    """Each optimizer step's statistic, for modules kept plain in the bank (one core: the stored core is W and its
    gradient dL/dW), against |W * dL/dW| summed by hand from the storage's gradient, which holds the sum over the
    step's two micro-batches."""

    from lora_over_trl.lora_over.model import banked_factors

    config = LoraOverConfig(capacity=1.0, schedule="dynamic", budget_ratio=0.3, interval=2, warmup_steps=2)
    callback = LoraOverCallback(config)
    checked = []

    class Check(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):  # runs before the scheduler's own
            factors = banked_factors(callback.model)
            expected = {}
            for name in callback.layers:
                if name in callback.current:
                    continue  # over-parameterized: W is contracted inside the forward
                pair = [factors[f"{name}.{attr}"] for attr in ("lora_A", "lora_B")]
                assert all(f.layout.num_cores == 1 for f in pair)
                expected[name] = sum(
                    float((f.cores[0].double() * f.core_grads()[0].double()).abs().sum()) for f in pair
                )
            update = callback.tracker.update

            def compare(measured):
                for name, value in expected.items():  # 0 while B is still 0 (B's init; then dL/dA = 0 too)
                    assert abs(measured[name] - value) <= 1e-5 * value + 1e-30, (name, measured[name], value)
                checked.append(sum(value > 0 for value in expected.values()))
                callback.tracker.update = update
                update(measured)

            callback.tracker.update = compare

    trainer = make_sft_trainer(
        tiny_llama_dir, tokenizer, tmp_path / "run", callback, gradient_accumulation_steps=2, max_steps=4
    )
    trainer.callback_handler.callbacks.insert(0, Check())
    trainer.train()
    assert len(checked) == 4 and checked[-1] > 0


@pytest.mark.parametrize("scope, levels", [("global", 1), ("per_type", 1), ("global", 2)])
def test_prepass_gives_capacity_to_the_modules_with_most_fisher_information(
    tiny_llama_dir, tokenizer, tmp_path, scope, levels
):
    config = LoraOverConfig(
        capacity=1.0,
        schedule="prepass",
        prepass_batches=3,
        budget_ratio=0.3,
        scope=scope,
        collapse_on_train_end=False,
        levels=levels,
    )
    trainer = make_trainer(tiny_llama_dir, tokenizer, tmp_path / "run", config, max_steps=3)
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LoraOverCallback))
    assert not over_parameterized_factors(trainer.model)  # nothing before the pre-pass
    scores = {}
    original = callback._fisher
    callback._fisher = lambda *a: scores.update(original(*a)) or scores
    probe = StorageProbe(trainer)
    trainer.train()
    probe.check()
    chosen = {k.rsplit(".", 1)[0] for k in over_parameterized_factors(trainer.model)}
    spent = sum(f.aux_params for f in over_parameterized_factors(trainer.model).values())
    assert chosen and spent <= callback.budget
    if levels > 1:  # the best-scored module holds the top level
        assert callback.current[max(scores, key=scores.get)] == 1.0
        assert set(callback.current.values()) <= {0.5, 1.0}
    elif scope == "global":  # greedy by score: everything scored above a chosen module is chosen or did not fit
        for name in chosen:
            assert all(
                other in chosen or callback.costs[other] > callback.budget - spent + callback.costs[name]
                for other in scores
                if scores[other] > scores[name]
            )
    else:
        assert len({module_type(n) for n in chosen}) > 1
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert all(torch.isfinite(torch.tensor(list(losses(trainer).values()))))


@pytest.mark.parametrize("levels", [1, 3])
def test_resume_after_reallocations_matches_an_uninterrupted_run(tiny_llama_dir, tokenizer, tmp_path, levels):
    config = LoraOverConfig(
        capacity=1.0, schedule="dynamic", budget_ratio=0.3, interval=2, warmup_steps=2, levels=levels
    )
    full = make_trainer(tiny_llama_dir, tokenizer, tmp_path / "full", config)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    saved = json.loads((checkpoint / SCHEDULER_FILE).read_text())["history"]
    assert saved[0]["modules"] != saved[-1]["modules"]  # the resumed run must rebuild a changed allocation
    resumed = make_trainer(tiny_llama_dir, tokenizer, tmp_path / "resumed", config)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = losses(full), losses(resumed)
    assert sorted(got) == list(range(1, 11))  # 1-4 come from the checkpoint's trainer state
    for step in range(5, 11):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    # and the collapsed adapters a user saves are the same
    from peft import get_peft_model_state_dict

    ours, theirs = (get_peft_model_state_dict(t.model) for t in (resumed, full))
    assert ours.keys() == theirs.keys() and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_plain_transformers_trainer(tiny_llama_dir, tokenizer, tmp_path):
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = get_peft_model(load_base(tiny_llama_dir, "fp32"), lora_config())
    data = gsm8k_dataset(16).map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=64), remove_columns=["text"]
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        report_to=[],
        logging_steps=1,
    )
    config = LoraOverConfig(capacity=1.0, schedule="dynamic", budget_ratio=0.3, interval=1, warmup_steps=1)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        callbacks=[LoraOverCallback(config)],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    assert (tmp_path / "checkpoint-2" / LAYOUT_FILE).is_file() and not over_parameterized_factors(model)
    assert all(torch.isfinite(torch.tensor(list(losses(trainer).values()))))


def test_dynamic_defaults_take_half_the_cost_and_fit_the_run(tiny_llama_dir, tokenizer, tmp_path):
    """``LoraOverConfig(schedule="dynamic")`` as is: the budget is half of what every module at ``capacity`` needs
    (read here off a static install, another path), and the fractional phases resolve against max_steps 10."""
    from lora_over_trl import apply_lora_over

    every_module = apply_lora_over(make_peft(tiny_llama_dir), LoraOverConfig(capacity=1.0)).aux_params
    callback = LoraOverCallback(LoraOverConfig(schedule="dynamic"))
    trainer = make_sft_trainer(tiny_llama_dir, tokenizer, tmp_path, callback, save_steps=100)
    trainer.train()
    assert callback.budget == every_module // 2 > 0
    # warm-up 10% (step 1), every 5% (at least 1 step), the last 20% (steps 8, 9, 10) frozen
    assert callback.phases == (1, 1, 8)
    assert [h["step"] for h in callback.history if h["event"] == "reallocate"] == list(range(1, 8))
    assert all(0 < h["aux_params"] <= callback.budget for h in callback.history if h["event"] != "collapse")


def test_bad_schedules_fail_before_any_step(tiny_llama_dir, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"`interval` must be an integer >= 1 \(steps\) or a fraction"):
        LoraOverConfig(schedule="dynamic", budget=10, interval=0)
    with pytest.raises(ValueError, match="holds no module"):
        make_trainer(tiny_llama_dir, tokenizer, tmp_path / "a", LoraOverConfig(schedule="dynamic", budget=5))
    with pytest.raises(ValueError, match="over the budget"):
        make_trainer(tiny_llama_dir, tokenizer, tmp_path / "b", LoraOverConfig(capacity=1.0, budget=1000))
    trainer = make_trainer(
        tiny_llama_dir, tokenizer, tmp_path / "c", LoraOverConfig(schedule="dynamic", budget_ratio=0.3, warmup_steps=10)
    )
    with pytest.raises(ValueError, match="leaves no re-allocation"):
        trainer.train()
    assert trainer.state.global_step == 0
    with pytest.raises(ValueError, match="no LoRA layers"):
        SFTTrainer(
            model=load_base(tiny_llama_dir, "fp32"),
            args=sft_args(tmp_path / "d"),
            train_dataset=gsm8k_dataset(),
            processing_class=tokenizer,
            callbacks=[LoraOverCallback(LoraOverConfig())],
        )


def run_two_processes(tiny_llama_dir, tokenizer, out, schedules, **env):
    """torchrun: two ddp_worker.py processes, training ``schedules`` (comma-separated) one after the other."""
    tokenizer.save_pretrained(out / "tokenizer")
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(Path(__file__).parent / "ddp_worker.py"),
        tiny_llama_dir,
        str(out / "tokenizer"),
        str(out),
        schedules,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


@pytest.fixture(scope="module")
def two_process_runs(tiny_llama_dir, tokenizer, tmp_path_factory) -> Path:
    """One launch of two processes that train the static, prepass and dynamic schedules in turn."""
    out = tmp_path_factory.mktemp("two-processes")
    done = run_two_processes(tiny_llama_dir, tokenizer, out, "static,prepass,dynamic")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["static", "prepass", "dynamic"])
def test_two_processes_keep_every_rank_identical(two_process_runs, schedule):
    ranks = [json.loads((two_process_runs / f"rank{r}-{schedule}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # different data shards, one set of trainable parameters: every gradient was averaged, and every rank took
    # the same decisions from statistics of the averaged gradients; without `ddp_find_unused_parameters` (every
    # factor is in the bank from the start: no LoRA weight goes without a gradient)
    assert ranks[0]["hash"] == ranks[1]["hash"]
    assert ranks[0]["history"] == ranks[1]["history"]
    if schedule == "dynamic":
        assert len({tuple(h) for h in ranks[0]["history"]}) > 1  # the allocation really changed


def test_moving_between_levels_grows_exactly_and_shrinks_by_the_reported_error(tiny_llama_dir, tokenizer, tmp_path):
    config = LoraOverConfig(capacity=1.0, schedule="dynamic", budget_ratio=2.0, levels=2, warmup_steps=1)
    trainer = make_trainer(tiny_llama_dir, tokenizer, tmp_path / "run", config)
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LoraOverCallback))
    callback.optimizer = trainer.create_optimizer()
    name = sorted(callback.current)[0]
    callback.current = {n: 1.0 for n in callback.current}
    factors = {k: f for k, f in over_parameterized_factors(trainer.model).items() if k.startswith(name + ".")}
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # fresh, non-trivial cores (B starts at zero)
        for factor in factors.values():
            for core in factor.cores:
                core.copy_(torch.randn(core.shape, generator=generator) * 0.3)

    def contracted() -> dict[str, np.ndarray]:
        current = over_parameterized_factors(trainer.model)
        return {k: reference_contract(current[k].effective_cores()) for k in factors}

    def bonds() -> dict[str, tuple]:
        return {k: over_parameterized_factors(trainer.model)[k].layout.bonds for k in factors}

    before, wide = contracted(), bonds()
    callback._move_capacity({**callback.current, name: 0.5}, 1, "test")  # shrink: TT-rounding, error measured
    error = callback.history[-1]["resized"][name]
    after, narrow = contracted(), bonds()
    assert all(n < w for k in factors for n, w in zip(narrow[k], wide[k], strict=True) if w > 1)
    measured = max(np.linalg.norm(after[k] - before[k]) / np.linalg.norm(before[k]) for k in factors)
    # every level keeps at least the exact bonds (a factor whose level cannot hold them stays plain), so the
    # SVD truncation between levels drops only directions the factor does not use: float rounding is left
    assert error <= 1e-5 and measured <= 1e-5 and error == pytest.approx(measured, abs=1e-6)
    callback._move_capacity({**callback.current, name: 1.0}, 2, "test")  # grow back: padded bonds, exact
    assert callback.history[-1]["resized"][name] == 0.0
    assert bonds() == wide
    regrown = contracted()
    assert all(np.abs(regrown[k] - after[k]).max() <= 1e-6 * np.abs(after[k]).max() for k in factors)
