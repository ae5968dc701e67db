"""Beyond data parallel: the SFT command under FSDP2 (QLoRA + FSDP) and DeepSpeed, through accelerate's real launcher
and the shipped configs in examples/accelerate/, on two CPU processes (gloo) with test_sft's tiny Llama.

accelerate 1.16 switches FSDP on only for GPU process groups: on CPU an FSDP launch silently trains as DDP. The
FSDP tests put tests/cpu_fsdp/ on PYTHONPATH, whose sitecustomize makes the one assignment accelerate's GPU branch
makes; the rest is accelerate's and torch's FSDP2 code. That FSDP really ran is checked on what it leaves behind:
accelerate's FSDP checkpoint file and DTensor shards (summary.json's `distributed.sharding`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, load_base, logits
from safetensors.torch import load_file
from test_sft import make_workspace, run_command, run_in_process, stock_peft_logits, write_recipe

from lora_over_trl.sft import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
CPU_FSDP = Path(__file__).parent / "cpu_fsdp"
# Short runs that two processes and one see alike: 6 steps of a global batch of 4 stay inside the first epoch
# (7 batches at max_length 96), so both see the same rows. Adam's eps sits above the smallest gradients: with 1e-8,
# a summation-order difference that flips a near-zero gradient's sign becomes a whole lr-sized step (1e-2 apart).
RUN = {"lora_r": 4, "max_steps": 6, "save_steps": 3, "adam_epsilon": 1e-3, "lora_over": {"schedule": "static"}}
ADAPTER = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer) -> Path:
    """test_sft's tiny Llama, tokenizer and GSM8K rows."""
    return make_workspace(tmp_path_factory.mktemp("distributed"), tokenizer)


def launch(config: str, recipe: Path, *flags: str, processes: int = 2):
    """``accelerate launch --config_file examples/accelerate/CONFIG -m lora_over_trl.sft RECIPE FLAGS``."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    launcher += ["--main_process_port", str(free_port())]
    return run_command(str(recipe), *flags, launcher=[*launcher, "--num_processes", str(processes)])


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def fsdp2_equals_one_process(
    workspace: Path,
    tmp_path: Path,
    batch,
    *,
    kind: str,
    weights_atol: float = 1e-5,
    config: str = "fsdp2_qlora.yaml",
    **recipe,
) -> Path:
    """Train under a shipped sharded config (FSDP2 by default, or DeepSpeed ZeRO-2) and in one process at the same
    global batch; the adapters (files, and stock PEFT's logits with them) agree: in float32 1e-5 on the weights, 1e-4
    on the logits. Returns the sharded run's folder (the reference's is ``tmp_path/one/run``)."""
    quantized = {"load_in_4bit": True, "bnb_4bit_quant_storage": "float32"} if kind == "nf4" else {}
    settings = {**RUN, **quantized, **recipe}
    sharded = launch(config, write_recipe(workspace, tmp_path / "fsdp", **settings))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    # the one-process reference: the command in this process (no launcher, nothing sharded)
    run_in_process(str(write_recipe(workspace, tmp_path / "one", **settings, per_device_train_batch_size=4)))
    run, reference = tmp_path / "fsdp" / "run", tmp_path / "one" / "run"

    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    if config.startswith("deepspeed"):
        assert summary["distributed"] == {"mode": "DeepSpeed ZeRO-2", "accelerate": "DistributedType.DEEPSPEED"}
        # ZeRO-2's own checkpoint: the optimizer state partitioned, one file per process
        assert (run / "checkpoint-3" / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    else:
        assert summary["distributed"]["mode"] == "FSDP2"
        assert summary["distributed"]["accelerate"] == "DistributedType.FSDP"
        assert (run / "checkpoint-3" / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP checkpoint, not DDP's
        sharding = summary["distributed"]["sharding"]
        assert sharding["base_weights_sharded"] == sharding["base_weights"] > 0
        assert sharding["base_local_elements"] * 2 == sharding["base_elements"]  # each process holds half

    ours, theirs = load_file(run / ADAPTER), load_file(reference / ADAPTER)
    assert max(v.abs().max().item() for k, v in ours.items() if "lora_B" in k) > 0.05  # it trained
    if kind == "nf4":
        # TRL trains a 4-bit base's adapter in bfloat16; Adam carries its rounding on, so the two runs agree only to
        # bfloat16's scale (measured 1.2e-2) and their logits do not compare at 1e-4
        assert max_difference(ours, theirs) <= 3e-2
        return run
    assert max_difference(ours, theirs) <= weights_atol
    model = str(workspace / "model")
    expected = stock_peft_logits(model, reference / "adapter", kind, batch)
    torch.testing.assert_close(stock_peft_logits(model, run / "adapter", kind, batch), expected, rtol=0, atol=1e-4)
    assert (expected - logits(load_base(model, kind), *batch)).abs().max() > 1e-3  # the adapter moved them
    return run


# The runtime schedules: re-allocations at steps 1, 3 and 5 (the last after the resume below), two capacity levels.
SCHEDULES = {
    "dynamic": {"schedule": "dynamic", "levels": 2, "budget_ratio": 0.5, "warmup_steps": 1, "interval": 2},
    "prepass": {"schedule": "prepass", "levels": 2, "budget_ratio": 0.5, "prepass_batches": 2},
}
SCHEDULES["dynamic"]["final_steps"] = 0


def decisions(run: Path) -> list[dict]:
    """The schedule's history, step by step: which modules held which capacity (timings left out)."""
    history = json.loads((run / "lora_over_history.json").read_text())
    assert history[-1]["event"] == "collapse" and history[-1]["max_error"] <= 1e-6
    keys = ("step", "event", "modules", "capacities", "aux_params")
    return [{k: h.get(k) for k in keys} for h in history[:-1]]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["dynamic", "prepass"])
def test_fsdp2_schedules_equal_one_process_step_by_step_and_resume_exactly(
    workspace, tmp_path, gsm8k_batch, monkeypatch, schedule
):
    # Every factor is in the bank (the root unit's parameter) from the start; a decision rewrites slots of the
    # gathered storage and of its Adam moments and writes each rank's shard back. The statistics come from
    # gradients summed over the two processes: the decisions are those of one process on the same global batch.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(CPU_FSDP), os.environ.get("PYTHONPATH")])))
    # the pre-pass gives 8 of 14 modules two cores from step 0: float32 summation-order differences of the
    # reduce-scatter grow a little more through them at lr 3e-2 (measured 1.1e-5 on the weights)
    atol = 2e-5 if schedule == "prepass" else 1e-5
    run = fsdp2_equals_one_process(
        workspace, tmp_path, gsm8k_batch, kind="fp32", weights_atol=atol, lora_over=SCHEDULES[schedule]
    )
    ours, theirs = decisions(run), decisions(tmp_path / "one" / "run")
    assert ours == theirs
    moved = {tuple(sorted((h["capacities"] or {}).items())) for h in ours}
    assert len(moved) > (2 if schedule == "dynamic" else 0) and all(h["modules"] for h in ours)
    if schedule == "prepass":
        return  # the resume of a fixed allocation is the dynamic case's first half
    uninterrupted = load_file(run / ADAPTER)
    # an interruption after step 3: only checkpoint-3 (written under FSDP2) is left; a marker in its log history
    # shows the resumed run started from it
    for name in ("checkpoint-6", "adapter", "summary.json", "lora_over_history.json"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    state_file = run / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][0]["loss"] = 123.0
    state_file.write_text(json.dumps(state))
    again = launch("fsdp2_qlora.yaml", tmp_path / "fsdp" / "recipe.yaml", "--resume_from_checkpoint", "true")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["losses"][0]["loss"] == 123.0 and summary["resumed_from"] == str(run / "checkpoint-3")
    assert max_difference(load_file(run / ADAPTER), uninterrupted) <= 1e-6
    assert decisions(run) == ours  # the checkpoint's layouts, tracker and history carried the schedule on


@pytest.mark.slow
def test_fsdp2_c3la_equals_one_process_and_resumes_exactly(workspace, tmp_path, gsm8k_batch, monkeypatch):
    # c3LA's chain under FSDP2: B (a DTensor shard in its decoder layer's unit) is gathered into the frozen part, the
    # window selector is written as each rank's shard, B's sharded Adam state restarts; windows move after steps 2
    # and 4 (the second after the resume from checkpoint-3), and the collapse writes the whole rank-3r adapter
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(CPU_FSDP), os.environ.get("PYTHONPATH")])))
    run = fsdp2_equals_one_process(
        workspace, tmp_path, gsm8k_batch, kind="fp32", method="c3la", lora_over=None, cla={"chain_interval": 2}
    )
    for folder in (run, tmp_path / "one" / "run"):
        assert json.loads((folder / "summary.json").read_text())["cla"]["windows"] == 3
        config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == 3 * RUN["lora_r"] and config["lora_alpha"] == 3 * 16
    uninterrupted = load_file(run / ADAPTER)
    assert all(v.shape[0 if "lora_A" in k else 1] == 3 * RUN["lora_r"] for k, v in uninterrupted.items())
    for name in ("checkpoint-6", "adapter", "summary.json"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    again = launch("fsdp2_qlora.yaml", tmp_path / "fsdp" / "recipe.yaml", "--resume_from_checkpoint", "true")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == str(run / "checkpoint-3") and summary["cla"]["windows"] == 3
    assert max_difference(load_file(run / ADAPTER), uninterrupted) <= 1e-6


@pytest.mark.slow
def test_fsdp2_qlora_shards_the_4bit_weights_and_equals_one_process(workspace, tmp_path, gsm8k_batch, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(CPU_FSDP), os.environ.get("PYTHONPATH")])))
    run = fsdp2_equals_one_process(workspace, tmp_path, gsm8k_batch, kind="nf4")
    # with bnb_4bit_quant_storage = the compute dtype, every 4-bit weight is a DTensor holding half of its storage
    sharding = json.loads((run / "summary.json").read_text())["distributed"]["sharding"]
    assert sharding["quantized_weights_sharded"] == sharding["quantized_weights"] == 14  # 7 linears x 2 layers
    assert sharding["quantized_local_elements"] * 2 == sharding["quantized_elements"]


@pytest.mark.slow
def test_fsdp2_plain_lora_writes_the_whole_adapter_and_merged(workspace, tmp_path, gsm8k_batch, monkeypatch):
    # plain LoRA keeps its weights sharded to the end: adapter/ and merged/ must hold them gathered, not a shard
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(CPU_FSDP), os.environ.get("PYTHONPATH")])))
    run = fsdp2_equals_one_process(
        workspace, tmp_path, gsm8k_batch, kind="fp32", method="lora", lora_over=None, merge=True
    )
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    expected = stock_peft_logits(str(workspace / "model"), run / "adapter", "fp32", gsm8k_batch)
    torch.testing.assert_close(logits(merged, *gsm8k_batch), expected, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora_over", "lora"])
def test_deepspeed_zero2_equals_one_process(workspace, tmp_path, gsm8k_batch, method):
    # DeepSpeed picks its CPU accelerator and gloo by itself; the recipes' `use_cpu: true` keeps accelerate's state
    # on CPU, and the shipped config's DeepSpeed plugin does the rest (no gate to lift, unlike FSDP)
    plain = {"method": "lora", "lora_over": None} if method == "lora" else {}
    fsdp2_equals_one_process(workspace, tmp_path, gsm8k_batch, kind="fp32", config="deepspeed_zero2.yaml", **plain)


FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
ZERO2 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
REFUSED = [
    (FSDP2, {"method": "glora", "lora_over": None}, "method: 'glora' under FSDP2 is not supported: GLoRA's"),
    ({**FSDP2, "FSDP_VERSION": "1"}, {}, "method: 'lora_over' under FSDP1 is not supported; set fsdp_version: 2"),
    (ZERO2, {"lora_over": {"schedule": "dynamic"}}, "'dynamic' under DeepSpeed ZeRO-2 is not supported: a re-alloc"),
    (ZERO2, {"method": "rc3la", "lora_over": None}, "method: 'rc3la' under DeepSpeed ZeRO-2 is not supported"),
    (ZERO3, {"lora_over": {"schedule": "static"}}, "method: 'lora_over' under DeepSpeed ZeRO-3 is not supported"),
    (ZERO3, {"method": "glora", "lora_over": None}, "method: 'glora' under DeepSpeed ZeRO-3 is not supported"),
]


@pytest.mark.parametrize("env, overrides, message", REFUSED)
def test_refused_before_anything_is_loaded(workspace, tmp_path, capsys, monkeypatch, env, overrides, message):
    for key, value in env.items():  # what `accelerate launch --config_file` tells the processes it starts
        monkeypatch.setenv(key, value)
    assert main([str(write_recipe(workspace, tmp_path, **{**RUN, **overrides}))]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "launch as DDP instead" in last, last
    assert not (tmp_path / "run").exists()


def test_what_runs_is_not_refused(monkeypatch):
    from lora_over_trl import ClaConfig, LoraOverConfig
    from lora_over_trl.registry import refusal
    from lora_over_trl.utils.distributed import ShardedMode

    static, dynamic = LoraOverConfig(schedule="static"), LoraOverConfig(schedule="dynamic")
    for mode in (None, ShardedMode("fsdp", 2), ShardedMode("deepspeed", 2)):
        assert refusal("lora_over", static, mode) is None and refusal("lora", None, mode) is None
    for schedule in ("prepass", "dynamic"):
        assert refusal("lora_over", LoraOverConfig(schedule=schedule), ShardedMode("fsdp", 2)) is None
    assert refusal("lora", None, ShardedMode("deepspeed", 3)) is None
    assert refusal("lora_over", dynamic, None) is None and refusal("c3la", ClaConfig(method="c3la"), None) is None
    for method in ("cla", "rcla", "c3la", "rc3la"):
        assert refusal(method, ClaConfig(method=method), ShardedMode("fsdp", 2)) is None


def test_a_chain_on_wrapped_experts_is_refused_under_fsdp2(monkeypatch):
    # PEFT's ParamWrapper reads lora_A's weight, which the chain widens at every step: FSDP2 keeps gathering the
    # weight it sharded (measured on a tiny Mixtral under fully_shard: "mat1 and mat2 shapes cannot be multiplied" at
    # the first forward after a chain step); cLA's one fixed window there trains
    from test_cla import tiny_moe_peft
    from transformers import TrainerControl, TrainerState

    from lora_over_trl import ClaCallback, ClaConfig
    from lora_over_trl.utils.callbacks import ScheduleSetupError

    for key, value in FSDP2.items():
        monkeypatch.setenv(key, value)
    model = tiny_moe_peft()
    ClaCallback(ClaConfig(method="cla")).on_init_end(None, TrainerState(), TrainerControl(), model=model)
    match = "ClaCallback: method: 'c3la' with target_parameters under FSDP2 is not supported: on a parameter-wrapping"
    with pytest.raises(ScheduleSetupError, match=match):
        ClaCallback(ClaConfig(method="c3la")).on_init_end(None, TrainerState(), TrainerControl(), model=tiny_moe_peft())


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_the_shipped_deepspeed_configs_refuse_through_the_launcher(workspace, tmp_path, config):
    # the real launcher starts two processes with its DeepSpeed environment; both stop before DeepSpeed starts
    schedule = "dynamic" if config == "deepspeed_zero2.yaml" else "static"
    done = launch(config, write_recipe(workspace, tmp_path, **{**RUN, "lora_over": {"schedule": schedule}}))
    # each process exits 2 with the one line; the traceback after it is the launcher's report of a failed child
    assert done.returncode != 0 and "(exitcode: 2)" in done.stderr and "[rank0]: Traceback" not in done.stderr
    stage = config[-6]
    assert f"error: lora_over.schedule: 'dynamic' under DeepSpeed ZeRO-{stage}" in done.stderr or (
        f"error: method: 'lora_over' under DeepSpeed ZeRO-{stage}" in done.stderr
    ), done.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_the_callback_refuses_a_sharded_run_in_a_script(tiny_llama_dir, tokenizer, tmp_path, monkeypatch):
    from conftest import make_sft_trainer

    from lora_over_trl import LoraOverCallback, LoraOverConfig
    from lora_over_trl.utils.callbacks import ScheduleSetupError

    for key, value in ZERO2.items():
        monkeypatch.setenv(key, value)
    match = "LoraOverCallback: lora_over.schedule: 'dynamic' under DeepSpeed ZeRO-2"
    with pytest.raises(ScheduleSetupError, match=match):
        make_sft_trainer(tiny_llama_dir, tokenizer, tmp_path, LoraOverCallback(LoraOverConfig(schedule="dynamic")))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fsdp2_qlora_on_two_gpus_equals_one_gpu(workspace, tmp_path, gsm8k_batch):
    # the shipped config as GPU users run it (no CPU gate to lift, NCCL); float32 so that the two runs can agree
    run = fsdp2_equals_one_process(workspace, tmp_path, gsm8k_batch, kind="nf4", use_cpu=False)
    sharding = json.loads((run / "summary.json").read_text())["distributed"]["sharding"]
    assert sharding["quantized_weights_sharded"] == sharding["quantized_weights"] > 0
