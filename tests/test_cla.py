"""cLA, random cLA, c3LA, random c3LA through a real TRL SFTTrainer on tiny Llamas; collapse; resume mid-chain."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    load_base,
    logged_losses,
    logits,
    lora_config,
    make_peft,
    make_sft_trainer,
    raises_exactly,
    stock_peft_logits_in_fresh_process,
)
from safetensors.torch import load_file

from lora_over_trl.methods.cla.callback import ClaCallback
from lora_over_trl.methods.cla.config import ClaConfig
from lora_over_trl.methods.cla.model import (
    ChainedB,
    WindowSelect,
    collapse_cla,
    selector,
    window_indices,
    window_offsets,
)
from lora_over_trl.utils.peft_layers import lora_modules


def make_trainer(tiny_llama_dir, tokenizer, out, config, kind="fp32", **overrides):
    return make_sft_trainer(tiny_llama_dir, tokenizer, out, ClaCallback(config), kind, **overrides)


losses = logged_losses


def delta_weight(layer) -> torch.Tensor:
    """``sum_j B_j A_j`` in float64, from the current window and the frozen ones, each multiplied on its own."""
    select, linear_b = layer.lora_A["default"], layer.lora_B["default"]
    r, n = len(select.current_indices), select.in_features
    total = linear_b.weight.double() @ selector(select.current_indices, n, torch.float64)
    if isinstance(linear_b, ChainedB):
        for j in range(linear_b.frozen.shape[1] // r):
            window = select.frozen_indices[j * r : (j + 1) * r]
            total += linear_b.frozen[:, j * r : (j + 1) * r].double() @ selector(window, n, torch.float64)
    return total.detach()


def test_window_is_a_gather_equal_to_the_dense_selector():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 40, generator=generator)
    for offset in (0, 12, 35):  # 35: the window wraps past the last column
        select = WindowSelect(40, (torch.arange(8) + offset) % 40, dtype=torch.float32, device=torch.device("cpu"))
        expected = x @ select.weight.T
        assert torch.equal(select(x), expected)  # 0/1 weights: the matmul is exact, so equality is bitwise
        assert not select.weight.requires_grad
        assert select.weight.sum() == 8 and (select.weight.sum(dim=0) <= 1).all()


def test_windows_of_any_shape_gather_their_columns_and_views_only_when_contiguous():
    """The fast path (a view of the activations) is taken exactly when the visited columns are one run; every
    other window (wrapping, strided, two columns apart) gathers, and all equal the dense selector."""
    assert window_indices(3, 4, 10).tolist() == [3, 4, 5, 6]
    assert window_indices(8, 4, 10).tolist() == [8, 9, 0, 1]
    x = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(7))
    cases = [  # (current, frozen, contiguous)
        ([3, 4], [5, 6], True),
        ([4], None, True),
        ([9, 0], None, False),
        ([0, 2, 4], None, False),
        ([3, 4], [0, 1], False),
        ([5, 7], None, False),
    ]
    for current, frozen, contiguous in cases:
        select = WindowSelect(10, torch.tensor(current), dtype=torch.float32, device=torch.device("cpu"))
        if frozen is not None:
            select.set_window(torch.tensor(current), torch.tensor(frozen))
        out = select(x)
        assert torch.equal(out, x[..., current + (frozen or [])]), (current, frozen)
        assert (out._base is x) == contiguous, (current, frozen)
        assert torch.equal(x @ select.weight.T, x[..., current])  # weight: the current window's selector


def test_collapse_keeps_rslora_scaling_and_pieces_report_their_shape(tiny_llama_dir, gsm8k_batch, tmp_path):
    """A chain of three windows collapses to rank 3r with rsLoRA's scaling kept (alpha / sqrt(r)), so stock PEFT
    reloads the same function; the chained B's declared shape is the trained B's."""
    from peft import PeftModel

    from lora_over_trl.methods.cla.model import install_cla, next_window

    model = make_peft(tiny_llama_dir, "fp32", use_rslora=True)
    config = ClaConfig(method="c3la")
    offsets = install_cla(model, config)
    generator = torch.Generator().manual_seed(11)
    layers = lora_modules(model)
    for step in range(1, 3):  # two chain steps with non-zero B's: three windows
        for name, layer in layers.items():
            with torch.no_grad():
                layer.lora_B["default"].weight.copy_(
                    0.05 * torch.randn(layer.lora_B["default"].weight.shape, generator=generator)
                )
            next_window(layer, "default", offsets[name][step])
    for layer in layers.values():
        chained, weight = layer.lora_B["default"], layer.lora_B["default"].weight
        assert (chained.in_features, chained.out_features) == (weight.shape[1], weight.shape[0])
        with torch.no_grad():
            weight.copy_(0.05 * torch.randn(weight.shape, generator=generator))
    trained = logits(model, *gsm8k_batch)
    scaling = 16 / 8**0.5
    assert collapse_cla(model) == 24
    assert model.peft_config["default"].lora_alpha == pytest.approx(scaling * 24**0.5, rel=1e-12)
    assert all(layer.r["default"] == 24 for layer in layers.values())
    assert all(layer.lora_alpha["default"] == model.peft_config["default"].lora_alpha for layer in layers.values())
    assert (logits(model, *gsm8k_batch) - trained).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_base(tiny_llama_dir, "fp32"), tmp_path / "adapter")
    assert (logits(reloaded, *gsm8k_batch) - trained).abs().max() <= 1e-5


def test_window_orders_are_seeded_and_cover_every_window():
    r, n = 8, 40
    chained = window_offsets(n, r, ClaConfig(method="c3la"), "model.layers.0.self_attn.q_proj")
    assert chained == [0, 8, 16, 24, 32]
    shuffled = window_offsets(n, r, ClaConfig(method="rc3la", seed=3), "model.layers.0.self_attn.q_proj")
    assert sorted(shuffled) == chained and shuffled != chained
    assert shuffled == window_offsets(n, r, ClaConfig(method="rc3la", seed=3), "model.layers.0.self_attn.q_proj")
    offsets = {window_offsets(n, r, ClaConfig(method="rcla"), f"layer{i}")[0] for i in range(20)}
    assert len(offsets) > 5 and all(0 <= o < n for o in offsets)
    # the seed is in the draw: another seed gives other windows and other orders (over 20 modules)
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(20)]
    for method in ("rcla", "rc3la"):
        by_seed = [[window_offsets(n, r, ClaConfig(method=method, seed=seed), m) for m in names] for seed in (3, 4)]
        assert by_seed[0] != by_seed[1], method
        assert sum(a != b for a, b in zip(*by_seed, strict=True)) > 10, method
    assert window_offsets(n, r, ClaConfig(method="cla"), "x") == [0]


@pytest.mark.parametrize("method, kind", [("cla", "fp32"), ("rcla", "nf4"), ("c3la", "fp32"), ("rc3la", "nf4")])
def test_trains_only_b_and_collapses_to_a_standard_adapter(
    tiny_llama_dir, tokenizer, gsm8k_batch, tmp_path, method, kind
):
    config = ClaConfig(method=method, chain_interval=3)
    trainer = make_trainer(tiny_llama_dir, tokenizer, tmp_path / "run", config, kind, max_steps=8, save_strategy="no")
    layers = lora_modules(trainer.model)
    selectors = [layer.lora_A["default"] for layer in layers.values()]
    assert all(isinstance(s, WindowSelect) for s in selectors)
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert trainable == {id(layer.lora_B["default"].weight) for layer in layers.values()}  # A is not trained
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ClaCallback))
    callback.config.collapse_on_train_end = False
    trainer.train()
    chained = method in ("c3la", "rc3la")
    assert callback.position == (2 if chained else 0)  # chain steps after steps 3 and 6 of 8
    trained = logits(trainer.model, *gsm8k_batch)
    expected = {name: delta_weight(layer) for name, layer in layers.items()}  # sum_j B_j A_j from the pieces
    rank = collapse_cla(trainer.model)
    assert rank == (3 if chained else 1) * 8
    for name, layer in layers.items():
        got = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        torch.testing.assert_close(got, expected[name], rtol=1e-12, atol=0)  # concatenation: exact
    # fp32: the same function; 4-bit: TRL trains B in bfloat16, where one matmul over k r columns rounds
    # differently from the chain's k matmuls (~1e-3 in the logits)
    tolerance = 1e-5 if kind == "fp32" else 1e-2
    assert (logits(trainer.model, *gsm8k_batch) - trained).abs().max() <= tolerance
    for layer in layers.values():
        a = layer.lora_A["default"].weight
        assert type(layer.lora_A["default"]) is torch.nn.Linear and a.shape[0] == rank
        assert set(a.unique().tolist()) <= {0.0, 1.0} and (a.sum(dim=1) == 1).all()  # rows select columns
        assert layer.lora_B["default"].weight.abs().max() > 0
    trainer.model.save_pretrained(tmp_path / "adapter")
    config_file = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_file["r"] == rank and config_file["lora_alpha"] / rank == 16 / 8  # the same scaling
    # stock PEFT, in a process that never imports this package, reproduces the trained function. TRL trained the
    # 4-bit run's B in bfloat16: keep the adapter's dtype (PEFT would upcast it to float32, skipping the bfloat16
    # rounding of the activations that the trained function has)
    stock = stock_peft_logits_in_fresh_process(
        tiny_llama_dir, tmp_path / "adapter", kind, gsm8k_batch, tmp_path, autocast_adapter_dtype=False
    )
    assert (stock - trained).abs().max() <= tolerance


def test_resume_in_the_middle_of_a_chain_matches_an_uninterrupted_run(tiny_llama_dir, tokenizer, tmp_path):
    config = ClaConfig(method="rc3la", chain_interval=3, seed=1)
    full = make_trainer(tiny_llama_dir, tokenizer, tmp_path / "full", config)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"  # one chain step (after step 3) behind it
    assert json.loads((checkpoint / "cla_chain.json").read_text())["position"] == 1
    resumed = make_trainer(tiny_llama_dir, tokenizer, tmp_path / "resumed", ClaConfig(**vars(config)))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = losses(full), losses(resumed)
    for step in range(5, 11):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_callback_events_chain_by_steps_or_epochs_reset_b_and_save_on_rank_zero(
    tiny_llama_dir, tmp_path, caplog, monkeypatch
):
    """The callback driven event by event, as the Trainer drives it: the chain interval resolved from a fraction
    (and logged), a new window at every interval but not at the run's last step, B's Adam moments dropped at each
    chain step, chain files written by rank zero only, a checkpoint of another chain refused, and the collapse's
    rank kept."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lora_over_trl.methods.cla.callback import CHAIN_FILE
    from lora_over_trl.utils.callbacks import ScheduleSetupError

    control = TrainerControl()
    raises_exactly(
        "ClaCallback: the model has no LoRA layers; pass peft_config=LoraConfig(...) to the trainer",
        ClaCallback(ClaConfig(method="c3la")).on_init_end,
        None,
        TrainerState(),
        control,
        model=load_base(tiny_llama_dir, "fp32"),
        error=ScheduleSetupError,
    )

    def started(unit: str, interval: float, max_steps: int, epochs: float):
        model = make_peft(tiny_llama_dir, "fp32")
        callback = ClaCallback(ClaConfig(method="c3la", chain_unit=unit, chain_interval=interval))
        state = TrainerState(max_steps=max_steps, num_train_epochs=epochs)
        callback.on_init_end(None, state, control, model=model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        with caplog.at_level("INFO", logger="lora_over_trl.methods.cla.callback"):
            callback.on_train_begin(None, state, control, optimizer=optimizer)
        return model, callback, state, optimizer

    caplog.clear()
    model, callback, state, optimizer = started("steps", 0.25, 40, 1.0)
    assert callback.every == 10 and callback.optimizer is optimizer
    assert "c3la: a new window every 10 steps (chain_interval 0.25 of 40 steps)" in caplog.messages
    b_weights = [layer.lora_B["default"].weight for layer in lora_modules(model).values()]
    for weight in b_weights:
        weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert all(weight in optimizer.state for weight in b_weights)
    for step in (9, 10, 11):
        state.global_step = step
        callback.on_step_end(None, state, control)
    assert callback.position == 1 and not any(weight in optimizer.state for weight in b_weights)
    assert all(weight.abs().max() == 0 for weight in b_weights)  # B restarts at zero in the new window
    state.global_step, state.epoch = 20, 1.0
    callback.on_epoch_end(None, state, control)  # a steps chain ignores epochs
    assert callback.position == 1
    state.global_step = 40  # the last step: no new window that nothing would train
    callback.on_step_end(None, state, control)
    assert callback.position == 1

    folder = tmp_path / "checkpoint-40"
    folder.mkdir()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    callback.on_save(args, TrainerState(global_step=40, is_world_process_zero=False), control)
    assert not (folder / CHAIN_FILE).exists()  # other ranks write nothing
    callback.on_save(args, TrainerState(global_step=40), control)
    assert json.loads((folder / CHAIN_FILE).read_text()) == {"method": "c3la", "position": 1}
    other = ClaCallback(ClaConfig(method="rc3la"))
    other.on_init_end(None, TrainerState(), control, model=make_peft(tiny_llama_dir, "fp32"))
    raises_exactly(f"{folder} holds a c3la chain, not rc3la", other._restore_chain, folder)
    callback.on_train_end(None, state, control)
    assert callback.rank == 16 and all(layer.r["default"] == 16 for layer in lora_modules(model).values())

    caplog.clear()
    model, callback, state, optimizer = started("epochs", 0.01, 100, 2.5)  # 0.01 of 3 epochs: at least one
    assert callback.every == 1
    assert "c3la: a new window every 1 epochs (chain_interval 0.01 of 3 epochs)" in caplog.messages
    state.epoch, state.global_step = 3.0, 100  # the run's end: no new window
    callback.on_epoch_end(None, state, control)
    assert callback.position == 0
    model, callback, state, optimizer = started("epochs", 0.7, 100, 2.5)  # 0.7 of 3 epochs: 2
    positions = []
    for epoch, step in ((1.0, 30), (2.0, 60), (3.0, 90)):
        state.epoch, state.global_step = epoch, step
        callback.on_epoch_end(None, state, control)
        callback.on_step_end(None, state, control)  # an epochs chain ignores steps
        positions.append(callback.position)
    assert callback.every == 2 and positions == [0, 1, 1]  # after every second epoch

    for key, value in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ScheduleSetupError) as caught:
        ClaCallback(ClaConfig(method="c3la")).on_init_end(None, TrainerState(), control, model=model)
    assert str(caught.value).startswith("ClaCallback: method: 'c3la' under DeepSpeed ZeRO-2 is not supported: the")


def test_restoring_a_chain_position_rebuilds_the_windows_it_visited(tiny_llama_dir):
    """Resume: position p has the windows of offsets p-1, ..., 0 frozen (most recent first) and B's frozen part in
    the adapter's dtype; position 0 has none."""
    from lora_over_trl.methods.cla.model import install_cla, restore_chain

    model = make_peft(tiny_llama_dir, "fp32")
    offsets = install_cla(model, ClaConfig(method="c3la"))
    name, layer = next(iter(lora_modules(model).items()))
    select, chained = layer.lora_A["default"], layer.lora_B["default"]
    r, n = len(select.current_indices), select.in_features
    frozen_b = torch.randn(chained.out_features, 3 * r, dtype=torch.float64)
    restore_chain(layer, "default", offsets[name], 3, frozen_b)
    visited = [window_indices(offsets[name][p % len(offsets[name])], r, n) for p in (2, 1, 0)]
    assert torch.equal(select.frozen_indices, torch.cat(visited))
    assert torch.equal(select.current_indices, window_indices(offsets[name][3 % len(offsets[name])], r, n))
    assert chained.frozen.dtype == torch.float32 and torch.equal(chained.frozen, frozen_b.float())
    restore_chain(layer, "default", offsets[name], 0, frozen_b[:, :0])
    assert select.frozen_indices.numel() == 0 and select.frozen_indices.dtype == torch.long
    assert torch.equal(select.all_indices, window_indices(offsets[name][0], r, n))


def test_a_named_adapter_chains_saves_and_collapses(tiny_llama_dir, tmp_path):
    """An adapter not named "default", through the callback's install, chain step, save and collapse."""
    from peft import get_peft_model
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lora_over_trl.methods.cla.callback import CHAIN_TENSORS

    torch.manual_seed(0)
    model = get_peft_model(load_base(tiny_llama_dir, "fp32"), lora_config(), adapter_name="other")
    callback, control = ClaCallback(ClaConfig(method="c3la", adapter_name="other", chain_interval=2)), TrainerControl()
    state = TrainerState(max_steps=8, num_train_epochs=1)
    callback.on_init_end(None, state, control, model=model)
    layers = lora_modules(model, "other")
    assert layers and all(isinstance(layer.lora_A["other"], WindowSelect) for layer in layers.values())
    callback.on_train_begin(None, state, control, optimizer=None)
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_B["other"].weight.fill_(0.5)
    state.global_step = 2
    callback.on_step_end(None, state, control)
    assert callback.position == 1 and all(layer.lora_B["other"].frozen.shape[1] == 8 for layer in layers.values())
    (tmp_path / "checkpoint-2").mkdir()
    callback.on_save(TrainingArguments(output_dir=str(tmp_path), report_to=[]), state, control)
    assert set(load_file(tmp_path / "checkpoint-2" / CHAIN_TENSORS)) == set(layers)
    resumed = ClaCallback(ClaConfig(method="c3la", adapter_name="other", chain_interval=2))
    torch.manual_seed(0)
    twin = get_peft_model(load_base(tiny_llama_dir, "fp32"), lora_config(), adapter_name="other")
    resumed.on_init_end(None, TrainerState(), control, model=twin)
    resumed._restore_chain(tmp_path / "checkpoint-2")  # what loading the checkpoint's adapter triggers
    assert resumed.position == 1
    for name, layer in lora_modules(twin, "other").items():
        assert torch.equal(layer.lora_B["other"].frozen, layers[name].lora_B["other"].frozen)
    callback.on_train_end(None, state, control)
    assert callback.rank == 16 and model.peft_config["other"].r == 16
    assert all(layer.lora_alpha["other"] == model.peft_config["other"].lora_alpha == 32 for layer in layers.values())
    assert all(layer.r["other"] == 16 and layer.lora_A["other"].weight.shape[0] == 16 for layer in layers.values())
    plain = make_peft(tiny_llama_dir, "fp32")  # no cLA installed: nothing to collapse, the config stays
    assert collapse_cla(plain) == 8 and plain.peft_config["default"].r == 8


def tiny_moe_peft():
    """A tiny Mixtral whose fused experts (and router, added by PEFT) are wrapped through ``target_parameters``."""
    from peft import get_peft_model
    from test_architectures import EXPERTS, tiny_base

    torch.manual_seed(0)
    return get_peft_model(tiny_base("mixtral"), lora_config(r=4, lora_alpha=8, target_parameters=EXPERTS))


def test_a_collapse_of_modules_at_different_chain_positions_is_refused(tiny_llama_dir):
    """One adapter config holds one rank multiplier: modules that visited different numbers of windows (only by
    hand; the callback moves every module together) are refused, not written with wrong ranks."""
    from lora_over_trl.methods.cla.model import install_cla, next_window

    model = make_peft(tiny_llama_dir, "fp32")
    offsets = install_cla(model, ClaConfig(method="c3la"))
    name, layer = next(iter(lora_modules(model).items()))
    next_window(layer, "default", offsets[name][1])
    raises_exactly("collapse_cla: modules visited different numbers of windows [1, 2]", collapse_cla, model)


def test_expert_windows_and_chains_follow_peft_layout_per_expert():
    """On PEFT's ParamWrapper (experts and router), each expert's update after a chain of three windows is the sum
    over windows of its own B columns times that window's selector, rebuilt here from PEFT's documented layout
    (lora_B column k * E + e is rank k of expert e) and compared with PEFT's own delta weight, during the chain and
    after the collapse; the collapse multiplies every rank, rank_pattern (PEFT's doubled gate_up_proj) included."""
    from peft.tuners.lora.layer import ParamWrapper

    from lora_over_trl.methods.cla.experts import trained_b
    from lora_over_trl.methods.cla.model import install_cla, next_window

    model = tiny_moe_peft()
    assert model.peft_config["default"].rank_pattern == {r".*\.gate_up_proj": 8}
    offsets = install_cla(model, ClaConfig(method="rc3la", seed=2))
    layers = lora_modules(model)
    wrapped = {name: layer for name, layer in layers.items() if isinstance(layer, ParamWrapper)}
    assert sorted({layer.num_experts for layer in wrapped.values()}) == [1, 4]  # routers, expert stacks
    ranks = {name: layer.r["default"] for name, layer in wrapped.items()}
    trained = {name: [] for name in wrapped}  # each window's B, in PEFT's layout
    generator = torch.Generator().manual_seed(3)
    for position in range(3):
        for name, layer in layers.items():
            weight = trained_b(layer.lora_B["default"])
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=generator))
            if name in wrapped:
                trained[name].append(weight.detach().clone())
        if position < 2:
            for name, layer in layers.items():
                next_window(layer, "default", offsets[name][position + 1])

    def expected(name: str, layer) -> torch.Tensor:
        experts, r, n = layer.num_experts, ranks[name], layer.in_features
        delta = torch.zeros(experts, layer.out_features, n, dtype=torch.float64)
        for position, weight_b in enumerate(trained[name]):
            window = (torch.arange(r) + offsets[name][position]) % n
            for e in range(experts):
                columns = [k * experts + e for k in range(r)]
                delta[e] += weight_b[:, columns].double() @ F.one_hot(window, n).double()
        return delta * layer.scaling["default"]

    def peft_delta(layer) -> torch.Tensor:
        delta = layer.get_delta_weight("default").double()
        return delta.unsqueeze(0) if delta.dim() == 2 else delta  # a router's is one (out, in) matrix

    before = {name: expected(name, layer) for name, layer in wrapped.items()}
    for name, layer in wrapped.items():
        torch.testing.assert_close(peft_delta(layer), before[name], rtol=1e-6, atol=1e-6)
    assert collapse_cla(model) == 12
    config = model.peft_config["default"]
    assert (config.rank_pattern, config.alpha_pattern, config.lora_alpha) == (
        {r".*\.gate_up_proj": 24},
        {r".*\.gate_up_proj": 48},
        24,
    )
    for name, layer in wrapped.items():
        assert layer.r["default"] == 3 * ranks[name]
        assert layer.lora_A["default"].weight.shape[0] == 3 * ranks[name] * layer.num_experts
        torch.testing.assert_close(peft_delta(layer), before[name], rtol=1e-6, atol=1e-6)


def test_an_expert_chain_resumes_from_its_checkpoint(tmp_path):
    """Mid-chain on a wrapped MoE, the checkpoint (adapter + chain files) rebuilds the same function in a fresh model
    through the callback's load_adapter hook, as a resumed Trainer run loads it."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lora_over_trl.methods.cla.experts import trained_b

    config, control = ClaConfig(method="c3la", chain_interval=1), TrainerControl()
    model, callback = tiny_moe_peft(), ClaCallback(config)
    state = TrainerState(max_steps=4, num_train_epochs=1)
    callback.on_init_end(None, state, control, model=model)
    callback.on_train_begin(None, state, control, optimizer=None)
    generator = torch.Generator().manual_seed(4)
    for step in (1, 2):
        for layer in lora_modules(model).values():
            weight = trained_b(layer.lora_B["default"])
            with torch.no_grad():
                weight.copy_(0.1 * torch.randn(weight.shape, generator=generator))
        state.global_step = step
        callback.on_step_end(None, state, control)
    assert callback.position == 2
    ids = torch.randint(0, 128, (2, 10), generator=generator)
    expected = logits(model, ids)
    folder = tmp_path / "checkpoint-2"
    model.save_pretrained(folder)
    callback.on_save(TrainingArguments(output_dir=str(tmp_path), report_to=[]), state, control)
    twin, resumed = tiny_moe_peft(), ClaCallback(ClaConfig(**vars(config)))
    resumed.on_init_end(None, TrainerState(), control, model=twin)
    assert (logits(twin, ids) - expected).abs().max() > 1e-3  # the fresh model is not already there
    twin.load_adapter(str(folder), "default", is_trainable=True)
    assert resumed.position == 2
    torch.testing.assert_close(logits(twin, ids), expected, rtol=0, atol=0)


def test_c3la_on_a_wrapped_moe_through_sft_trainer_reloads_in_stock_peft(tokenizer, gsm8k_batch, tmp_path):
    """What a user runs: TRL's SFTTrainer on a tiny Mixtral, LoRA on all linear layers plus the fused experts
    (target_parameters), c3LA with two chain steps; the saved adapter, loaded by stock PEFT in a process that never
    imports this package, gives the trained logits (it used to fail with a size mismatch for every module)."""
    from test_architectures import EXPERTS, FAMILIES
    from transformers import AutoModelForCausalLM

    config = FAMILIES["mixtral"].config()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    base_dir = str(tmp_path / "base")
    lora = dict(r=4, lora_alpha=8, target_parameters=EXPERTS)
    callback = ClaCallback(ClaConfig(method="c3la", chain_interval=2))
    trainer = make_sft_trainer(
        base_dir, tokenizer, tmp_path / "run", callback, lora=lora, max_steps=6, save_strategy="no"
    )
    trainer.train()
    assert callback.position == 2 and callback.rank == 12
    trained = logits(trainer.model, *gsm8k_batch)
    trainer.save_model(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["rank_pattern"]) == (12, {r".*\.gate_up_proj": 24})
    stock = stock_peft_logits_in_fresh_process(base_dir, tmp_path / "adapter", "fp32", gsm8k_batch, tmp_path)
    assert (stock - trained).abs().max() <= 1e-5
