"""Every method on tiny models of the families users fine-tune: install, train, collapse or export, reload.

For each family x method: installing keeps the logits, a few AdamW steps move them, the method's collapse or export
runs, and what it writes reloads to the trained logits: an adapter through stock PEFT
(``PeftModel.from_pretrained`` on a freshly loaded base; this package patches nothing in PEFT or transformers, so
loading in this process runs only their code), a merged folder through ``AutoModelForCausalLM``. Where a family x
method pair cannot train, the test asserts the refusal's whole line.

Families cover the layer kinds PEFT adapts: plain linears (Llama, Qwen3, Gemma 3), attention biases (Qwen2), fused
``qkv_proj`` / ``gate_up_proj`` linears (Phi-3), GPT-2's transposed ``Conv1D``, and fused 3-D expert stacks plus a
router wrapped through ``target_parameters`` (Mixtral: PEFT's ``ParamWrapper``). Methods are keyed by name in
``METHODS``; a new one (another LoRA-Over schedule) is one more entry.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import logits, lora_config
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState

from lora_over_trl import (
    ClaCallback,
    ClaConfig,
    GloraConfig,
    LoraOverCallback,
    LoraOverConfig,
    apply_lora_over,
    collapse,
    export_glora,
    export_merged,
)
from lora_over_trl.methods.glora.model import fix_choices, install_glora, sample_choices

STEPS = 4  # optimizer steps per run; the chains move their window after step 2
VOCAB = 128
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@dataclass(frozen=True)
class Family:
    """A tiny model of one architecture family: its config, and the LoRA settings a user would give it."""

    config: Callable[[], Any]
    lora: dict[str, Any] = field(default_factory=dict)
    merged: bool = False  # also check export_merged (the merged/ folder) for the adapter methods


def _config(name: str, **values: Any) -> Callable[[], Any]:
    def build():
        import transformers

        return getattr(transformers, name)(**values)

    return build


TINY = dict(vocab_size=VOCAB, max_position_embeddings=64, **SHAPE)
MOE = dict(head_dim=8, num_experts_per_tok=2, **TINY)
FAMILIES = {
    "llama": Family(_config("LlamaConfig", **TINY)),
    "qwen2": Family(_config("Qwen2Config", **TINY)),  # biases on q, k, v
    "qwen3": Family(_config("Qwen3Config", head_dim=8, **TINY)),
    "gemma3": Family(_config("Gemma3TextConfig", head_dim=8, query_pre_attn_scalar=8, sliding_window=8, **TINY)),
    "phi3": Family(_config("Phi3Config", pad_token_id=0, bos_token_id=1, eos_token_id=2, **TINY)),  # fused linears
    "gpt2": Family(
        _config(
            "GPT2Config",
            vocab_size=VOCAB,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
        lora=dict(fan_in_fan_out=True),  # Conv1D stores W as (in, out)
        merged=True,
    ),
    # experts as fused 3-D parameters: PEFT adds the router (a 2-D parameter) and doubles gate_up_proj's rank
    "mixtral": Family(_config("MixtralConfig", num_local_experts=4, **MOE), dict(target_parameters=EXPERTS), True),
    "qwen3_moe": Family(
        _config("Qwen3MoeConfig", num_experts=4, moe_intermediate_size=32, **MOE), dict(target_parameters=EXPERTS), True
    ),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices of 32 x 64 gain nothing from threads, and on a busy machine every parallel region waits for a
    descheduled thread (measured: 0.75 s per forward and backward with 2 threads, 5 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_base(family: str):
    """A family's tiny base, seeded, with every bias random (zero biases would hide the terms that multiply them)."""
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(FAMILIES[family].config())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "bias", None), torch.nn.Parameter):
                module.bias.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory) -> Callable[[str], str]:
    """Each family's :func:`tiny_base` saved once as a model folder."""
    saved: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in saved:
            path = tmp_path_factory.mktemp(family)
            tiny_base(family).save_pretrained(path)
            saved[family] = str(path)
        return saved[family]

    return get


class Lora:
    """Plain PEFT LoRA: nothing installed, the adapter saved as trained."""

    artifact = "adapter"
    lora_init = True  # PEFT's init_lora_weights: True gives B = 0

    def refusal(self, model) -> str | None:
        return None

    def install(self, model) -> None:
        pass

    def begin(self, model, optimizer) -> None:
        pass

    def before_step(self, model, step: int) -> None:
        pass

    def before_optimizer_step(self, model) -> None:
        pass

    def after_step(self, model, step: int) -> None:
        pass

    def finish(self, model, folder: Path) -> Path:
        model.save_pretrained(folder)
        return folder


class LoraOver(Lora):
    """LoRA-Over through its public functions: ``apply_lora_over`` (on a non-zero ``B``, so keeping the function
    is not trivially true) and ``collapse``."""

    lora_init = False

    def __init__(self, config: LoraOverConfig) -> None:
        self.config = config

    def install(self, model) -> None:
        apply_lora_over(model, self.config)

    def finish(self, model, folder: Path) -> Path:
        collapse(model)
        return super().finish(model, folder)


class LoraOverScheduled(LoraOver):
    """LoRA-Over's runtime schedules through ``LoraOverCallback``, driven event by event as the Trainer drives it:
    the pre-pass scores one batch, the dynamic schedule re-allocates after steps 1 to 3; collapsed at
    ``on_train_end``. On an MoE model the wrapped experts and routers are modules it chooses among."""

    def __init__(self, schedule: str) -> None:
        phases = dict(warmup_steps=1, interval=1, final_steps=0) if schedule == "dynamic" else dict(prepass_batches=1)
        super().__init__(LoraOverConfig(capacity=1.0, schedule=schedule, budget_ratio=0.3, levels=2, **phases))
        self.callback = LoraOverCallback(self.config)
        self.state, self.control = TrainerState(max_steps=STEPS, num_train_epochs=1), TrainerControl()

    def install(self, model) -> None:
        self.args = SimpleNamespace(learning_rate=1e-2, output_dir=str(self.folder))
        self.callback.on_init_end(self.args, self.state, self.control, model=model)

    def begin(self, model, optimizer) -> None:
        ids = self.batch
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        events = dict(model=model, optimizer=optimizer, train_dataloader=[batch])
        self.callback.on_train_begin(self.args, self.state, self.control, **events)

    def before_optimizer_step(self, model) -> None:
        self.callback.on_pre_optimizer_step(self.args, self.state, self.control)

    def after_step(self, model, step: int) -> None:
        self.state.global_step = step
        self.callback.on_step_end(self.args, self.state, self.control)

    def finish(self, model, folder: Path) -> Path:
        self.callback.on_train_end(self.args, self.state, self.control)
        held = [set(h["modules"]) for h in self.callback.history if "modules" in h]
        assert held and all(held) and (self.config.schedule == "prepass" or len(set(map(frozenset, held))) > 1)
        if model.peft_config["default"].target_parameters:  # the scheduler chose among wrapped expert stacks too
            assert any("experts" in name for modules in held for name in modules), held
        return Lora.finish(self, model, folder)


class Cla(Lora):
    """The cLA family through its callback, driven event by event as the Trainer drives it (chains move their
    window after step 2 and reset B's Adam moments), collapsed at ``on_train_end``."""

    def __init__(self, method: str) -> None:
        self.callback = ClaCallback(ClaConfig(method=method, chain_interval=2))
        self.state, self.control = TrainerState(max_steps=STEPS, num_train_epochs=1), TrainerControl()

    def install(self, model) -> None:
        self.callback.on_init_end(None, self.state, self.control, model=model)

    def begin(self, model, optimizer) -> None:
        self.callback.on_train_begin(None, self.state, self.control, optimizer=optimizer)

    def after_step(self, model, step: int) -> None:
        self.state.global_step = step
        self.callback.on_step_end(None, self.state, self.control)

    def finish(self, model, folder: Path) -> Path:
        self.callback.on_train_end(None, self.state, self.control)
        assert self.callback.position == (1 if self.callback.config.chained else 0)
        return super().finish(model, folder)


class Glora(Lora):
    """GLoRA's supernet: a choice per layer drawn before each step as its callback draws it, then one fixed
    configuration (what the search would pick) merged by ``export_glora``."""

    artifact = "merged"

    def __init__(self) -> None:
        # new_biases off: not every family has a config switch that gives a bias-less layer a bias (Qwen2's o_proj
        # and MLP, Qwen3's MLP), and the export refuses those; C, D and E still train where a layer has a bias
        # (Qwen2's q, k, v; every GPT-2 layer)
        self.config = GloraConfig(ranks=[2, 4], new_biases=False)

    def refusal(self, model) -> str | None:
        wrapped = model.peft_config["default"].target_parameters  # what PEFT made of all-linear + EXPERTS
        if not wrapped:
            return None
        return (
            f"target_parameters: {sorted(wrapped)} is not supported by method 'glora' (its support tensors act on a "
            "linear layer's input, output and bias; PEFT adapts these parameters, e.g. MoE experts and routers, as a "
            "bare weight delta); leave target_parameters empty and name linear layers in target_modules (on an MoE "
            "model PEFT turns 'all-linear' into expert target_parameters)"
        )

    def install(self, model) -> None:
        self.spaces = install_glora(model, self.config)
        self.before_step(model, 0)  # GloraCallback draws step 0's choice at once

    def before_step(self, model, step: int) -> None:
        fix_choices(model, sample_choices(self.spaces, random.Random(f"glora:0:{step}")))

    def finish(self, model, folder: Path) -> Path:
        return export_glora(model, folder)


METHODS: dict[str, Callable[[], Lora]] = {
    "lora": Lora,
    "lora_over_static": lambda: LoraOver(LoraOverConfig(capacity=1.0, schedule="static")),
    "lora_over_prepass": lambda: LoraOverScheduled("prepass"),
    "lora_over_dynamic": lambda: LoraOverScheduled("dynamic"),
    "cla": lambda: Cla("cla"),
    "rcla": lambda: Cla("rcla"),
    "c3la": lambda: Cla("c3la"),
    "rc3la": lambda: Cla("rc3la"),
    "glora": Glora,
}


def train(model, run: Lora, ids: torch.Tensor) -> None:
    """``STEPS`` AdamW steps on ``ids`` (next-token loss), firing the run's hooks where the Trainer would."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run.begin(model, optimizer)
    for step in range(1, STEPS + 1):
        run.before_step(model, step - 1)
        model(input_ids=ids, labels=ids).loss.backward()
        run.before_optimizer_step(model)
        optimizer.step()
        optimizer.zero_grad()
        run.after_step(model, step)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_method_trains_and_reloads_on_family(family, method, base_dirs, tmp_path):
    from peft import PeftModel, get_peft_model

    base_dir, spec, run = base_dirs(family), FAMILIES[family], METHODS[method]()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base_logits = logits(base, ids)
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(r=4, lora_alpha=8, init_lora_weights=run.lora_init, **spec.lora))
    before = logits(model, ids)
    if run.lora_init is True:  # PEFT's own init is a no-op adapter
        torch.testing.assert_close(before, base_logits, rtol=0, atol=0)
    run.folder, run.batch = tmp_path / "run", ids
    refused = run.refusal(model)
    if refused is not None:
        with pytest.raises(ValueError) as caught:
            run.install(model)
        assert str(caught.value) == refused
        return
    run.install(model)
    installed = logits(model, ids)
    torch.testing.assert_close(installed, before, rtol=0, atol=1e-6)

    train(model, run, ids)
    trained = logits(model, ids)
    assert (trained - installed).abs().max() > 1e-2  # the steps moved the function

    written = run.finish(model, tmp_path / run.artifact)
    if run.artifact == "merged":
        reloaded = AutoModelForCausalLM.from_pretrained(written)
    else:
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), written)
    torch.testing.assert_close(logits(reloaded, ids), trained, rtol=0, atol=1e-4)
    if spec.merged and run.artifact == "adapter":
        merged = export_merged(model, tmp_path / "merged", base_model_name_or_path=base_dir)
        torch.testing.assert_close(
            logits(AutoModelForCausalLM.from_pretrained(merged), ids), trained, rtol=0, atol=1e-4
        )
