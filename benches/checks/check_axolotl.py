"""``make check-axolotl``: the Axolotl plugin trained by a real ``axolotl train``, checked end to end.

    .venv-axolotl/bin/python benches/checks/check_axolotl.py --smollm2 PATH        # what `make check-axolotl` runs
    .venv-axolotl/bin/python benches/checks/check_axolotl.py --skip-bench           # the correctness checks only

Runs in the Axolotl venv. For LoRA-Over (dynamic and prepass schedules), cLA and c3LA on a tiny Llama and
Alpaca-format GSM8K rows (the first 64 of ``--gsm8k-dir``'s train.jsonl), it checks that
  * ``axolotl train`` with the plugin writes a standard PEFT adapter into Axolotl's ``output_dir``;
  * that adapter, loaded by stock PEFT in a fresh process that never imports ``lora_over_trl``, reproduces the
    logits of the model as trained (recorded by ``benches/checks/axolotl_probe.py`` before the collapse), within 1e-5,
    while differing from the base model's by far more (so an adapter that loaded nothing fails);
  * a run resumed from its middle checkpoint (``resume_from_checkpoint``) ends with the same adapter and logits;
  * conflicting settings (Axolotl's fused LoRA kernels left to switch on, DoRA, GLoRA) stop ``axolotl train`` at
    config validation with the plugin's one-line message, before a model is loaded;
  * docs/axolotl.md links the config this trains, ``examples/axolotl/smollm2_qlora_lora_over.yml``.
It prints tables and exits 1 on any failure. Then (unless ``--skip-bench``) it trains that example (SmolLM2-135M,
4-bit QLoRA) for ``--bench-steps`` steps with and without the plugin and prints the seconds per step.
This script imports neither ``lora_over_trl`` nor Axolotl: they run in the subprocesses it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benches/, where benchlib lives (standard library only: no torch here)
from benchlib.data import add_gsm8k_dir, gsm8k_rows  # noqa: E402

PLUGIN = "lora_over_trl.integrations.axolotl.LoraOverPlugin"
PROBE = "axolotl_probe.ProbePlugin"  # benches/checks/ is put on PYTHONPATH for the runs
KERNELS_OFF = dict.fromkeys(("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel"), False)
EXAMPLE = ROOT / "examples" / "axolotl" / "smollm2_qlora_lora_over.yml"
LOGITS_TOLERANCE = 1e-5
RESUME_TOLERANCE = 1e-6
# The methods the check trains: name -> the plugin keys. Intervals of 2 steps put a re-allocation (LoRA-Over)
# or a window move (c3LA) on both sides of the checkpoint at step 3, so resuming must restore them; the pre-pass
# chooses its modules before step 1, and a resumed run must take them from the checkpoint, not choose again.
CASES: dict[str, dict[str, Any]] = {
    "lora_over dynamic": {
        "lora_over_method": "lora_over",
        "lora_over": {"schedule": "dynamic", "budget_ratio": 0.5, "interval": 2},
    },
    "lora_over prepass": {
        "lora_over_method": "lora_over",
        "lora_over": {"schedule": "prepass", "budget_ratio": 0.5, "prepass_batches": 2},
    },
    "cla": {"lora_over_method": "cla"},
    "c3la": {"lora_over_method": "c3la", "lora_over_cla": {"chain_interval": 2}},
}

# Settings the plugin must refuse at config time: name -> (plugin and Axolotl keys, text its message must hold).
# The kernel keys set to None are left out of the YAML: Axolotl then switches the fused LoRA kernels on itself.
REFUSALS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "kernels unset, DoRA": (
        {**dict.fromkeys(KERNELS_OFF), "lora_over_method": "cla", "peft_use_dora": True},
        ["lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel, lora_embedding_kernel: true", "peft_use_dora: True"],
    ),
    "glora": ({"lora_over_method": "glora"}, ["lora_over_method: 'glora': GLoRA is not offered"]),
}


# ---- inputs ------------------------------------------------------------------------------------------------


def write_alpaca(path: Path, rows: int, gsm8k_dir: str) -> Path:
    """``rows`` GSM8K training problems as Alpaca records (instruction, input, output)."""
    with path.open("w") as out:
        for row in gsm8k_rows(gsm8k_dir, "train", rows):
            out.write(json.dumps({"instruction": row["question"], "input": "", "output": row["answer"]}) + "\n")
    return path


def write_tiny_llama(folder: Path, data: Path) -> Path:
    """A two-layer Llama from a config (random weights) with a byte-level BPE tokenizer trained on ``data``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [" ".join(json.loads(line).values()) for line in data.read_text().splitlines()]
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def axolotl_config(base: Path, data: Path, work: Path, output_dir: Path, **keys: Any) -> dict[str, Any]:
    """An Axolotl LoRA config for a CPU run of a few steps (``keys`` override or add)."""
    return {
        "base_model": str(base),
        "datasets": [{"path": str(data), "type": "alpaca", "ds_type": "json"}],
        "dataset_prepared_path": str(work / "prepared"),
        "val_set_size": 0,
        "output_dir": str(output_dir),
        "sequence_len": 384,
        "sample_packing": False,
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": 6,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "learning_rate": 1e-3,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_steps": 3,
        "seed": 42,
        "special_tokens": {"pad_token": "<|endoftext|>"},
        **KERNELS_OFF,
        "plugins": [PLUGIN, PROBE],
        **keys,
    }


# ---- running ------------------------------------------------------------------------------------------------


def run_axolotl(config: dict[str, Any], folder: Path, name: str) -> tuple[int, Path, Path]:
    """``axolotl train`` on ``config`` (written to ``folder/name.yml``): exit code, log file, probe file."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    probe, log = folder / f"{name}.probe.pt", folder / f"{name}.log"
    env = {
        **os.environ,
        "AXOLOTL_DO_NOT_TRACK": "1",  # telemetry retries a remote host and hangs an offline run
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "AXOLOTL_PROBE_OUT": str(probe),
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        # as in an activated venv: `axolotl train` starts `accelerate launch` found on PATH
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    axolotl = Path(sys.executable).with_name("axolotl")
    with log.open("w") as handle:
        done = subprocess.run(
            [str(axolotl), "train", str(config_path)], env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT
        )  # from the repository root, where the example's relative dataset path points
    return done.returncode, log, probe


def axolotl_train(config: dict[str, Any], folder: Path, name: str) -> dict[str, Any]:
    """:func:`run_axolotl` that must succeed; returns the probe's record (logits, step times, wall time)."""
    import torch

    started = time.perf_counter()
    code, log, probe = run_axolotl(config, folder, name)
    if code != 0 or not probe.is_file():
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"axolotl train {folder / name}.yml failed (exit {code}); log {log}:\n{tail}")
    record = torch.load(probe)
    record["wall_seconds"] = time.perf_counter() - started
    return record


def check_refusal(name: str, keys: dict[str, Any], expected: list[str], base: Path, data: Path, work: Path) -> dict:
    """``axolotl train`` must stop at config validation with the plugin's line, before any model is loaded."""
    folder = work / "refused" / name.replace(" ", "_")
    shutil.rmtree(folder, ignore_errors=True)
    config = {k: v for k, v in axolotl_config(base, data, work, folder / "out", **keys).items() if v is not None}
    code, log, _ = run_axolotl(config, folder, "run")
    text = log.read_text()
    line = next((x for x in text.splitlines() if "lora_over_trl plugin:" in x), "")
    ok = code != 0 and all(e in line for e in expected) and "axolotl.loaders.model" not in text
    return {"refused config": name, "exit": code, "message": line.strip()[:110] + "...", "ok": ok}


def reload_in_stock_peft(base: Path, adapter: Path, probe: Path) -> dict[str, Any]:
    """Run :func:`reload_main` in a fresh process (one that never imports ``lora_over_trl``)."""
    done = subprocess.run(
        [sys.executable, __file__, "reload", str(base), str(adapter), str(probe)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"stock PEFT reload of {adapter} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def reload_main(base: str, adapter: str, probe: str) -> None:
    """The fresh process: stock transformers + PEFT load the adapter; prints the logits' distance as JSON."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    record = torch.load(probe)
    keys = sorted(load_file(str(Path(adapter) / "adapter_model.safetensors")))
    standard = all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=record["input_ids"]).logits.float()
        with model.disable_adapter():
            base_logits = model(input_ids=record["input_ids"]).logits.float()
    print(
        json.dumps(
            {
                "max_abs_diff": float((logits - record["logits"]).abs().max()),
                # what training changed: an adapter that loaded nothing would sit this far off, not within 1e-5
                "adapter_effect": float((logits - base_logits).abs().max()),
                "standard_keys": standard and bool(keys),
                "lora_over_trl_imported": any(name.startswith("lora_over_trl") for name in sys.modules),
            }
        )
    )


def adapter_distance(first: Path, second: Path) -> float:
    """Largest absolute difference between two adapters' tensors (``inf`` if their keys differ)."""
    from safetensors.torch import load_file

    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (first, second))
    if set(a) != set(b):
        return float("inf")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check_case(name: str, keys: dict[str, Any], base: Path, data: Path, work: Path) -> dict[str, Any]:
    """Train, reload in stock PEFT, resume from the middle checkpoint; one table row."""
    folder = work / name.replace(" ", "_")
    shutil.rmtree(folder, ignore_errors=True)
    full_dir, resumed_dir = folder / "full", folder / "resumed"
    full = axolotl_train(axolotl_config(base, data, work, full_dir, **keys), folder, "full")
    reload = reload_in_stock_peft(base, full_dir, folder / "full.probe.pt")
    middle = sorted(full_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]
    shutil.copytree(middle, resumed_dir / middle.name)
    checkpoint = str(resumed_dir / middle.name)
    config = axolotl_config(base, data, work, resumed_dir, resume_from_checkpoint=checkpoint, **keys)
    resumed = axolotl_train(config, folder, "resumed")
    resume_diff = adapter_distance(full_dir, resumed_dir)
    logits_resume = float((full["logits"] - resumed["logits"]).abs().max())
    ok = (
        reload["standard_keys"]
        and not reload["lora_over_trl_imported"]
        and reload["max_abs_diff"] <= LOGITS_TOLERANCE
        and reload["adapter_effect"] >= 100 * LOGITS_TOLERANCE
        and full["steps"] == resumed["steps"] == config["max_steps"]
        and resume_diff <= RESUME_TOLERANCE
        and logits_resume <= RESUME_TOLERANCE
    )
    return {
        "method": name,
        "steps": full["steps"],
        "standard adapter": reload["standard_keys"],
        "adapter |dlogits| vs base": reload["adapter_effect"],
        "reload |dlogits|": reload["max_abs_diff"],
        "resumed from": middle.name,
        "resume |dadapter|": resume_diff,
        "resume |dlogits|": logits_resume,
        "ok": ok,
    }


def bench(smollm2: Path, work: Path, steps: int) -> list[dict[str, Any]]:
    """The example config (SmolLM2-135M 4-bit QLoRA), as written but for the local base and the step count, with
    and without the plugin; seconds per optimizer step."""
    import yaml

    example = yaml.safe_load(EXAMPLE.read_text())
    example.update(
        base_model=str(smollm2),
        max_steps=steps,
        save_steps=steps,
        logging_steps=5,
        dataset_prepared_path=str(work / "prepared"),
        plugins=[*example["plugins"], PROBE],
    )
    plain = {k: v for k, v in example.items() if not k.startswith("lora_over")} | {"plugins": [PROBE]}
    variants = {
        "LoRA (no plugin)": plain,
        "LoRA-Over dynamic (the example)": example,
        "LoRA-Over static (capacity 1)": {**example, "lora_over": {"capacity": 1.0}},
        "c3LA (chain_interval 5)": {
            **{k: v for k, v in example.items() if k != "lora_over"},
            "lora_over_method": "c3la",
            "lora_over_cla": {"chain_interval": 5},
        },
    }
    rows = []
    for label, config in variants.items():
        folder = work / "bench" / label.split(" (")[0].replace(" ", "_").lower()
        shutil.rmtree(folder, ignore_errors=True)
        record = axolotl_train({**config, "output_dir": str(folder / "out")}, folder, "run")
        seconds, cpu = record["step_seconds"][2:], record["step_cpu_seconds"][2:]  # the first steps warm caches up
        rows.append(
            {
                "config": label,
                "steps": record["steps"],
                "s/step (median)": statistics.median(seconds),
                "s/step (mean)": statistics.fmean(seconds),
                "CPU s/step (median)": statistics.median(cpu),
                "run wall s": record["wall_seconds"],
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """A plain text table, one column per key of the longest row."""
    columns = list(max(rows, key=len))  # a row that failed early has fewer keys: "-" in the others
    cells = [[_cell(row.get(c, "-")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _cell(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["reload"]:
        reload_main(*argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "check_axolotl", help="scratch folder")
    parser.add_argument(
        "--smollm2",
        type=Path,
        help="SmolLM2-135M folder (lora_over_trl.utils.smollm2.smollm2_folder())",
    )
    parser.add_argument("--bench-steps", type=int, default=20)
    parser.add_argument("--skip-bench", action="store_true", help="only the correctness checks")
    parser.add_argument("--only", choices=list(CASES), nargs="*", help="check these methods only")
    add_gsm8k_dir(parser)
    args = parser.parse_args(argv)
    if not args.skip_bench and (args.smollm2 is None or not (args.smollm2 / "config.json").is_file()):
        parser.error(f"--smollm2: {args.smollm2} is not a model folder (or pass --skip-bench)")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = write_alpaca(work / "alpaca_gsm8k.jsonl", 64, args.gsm8k_dir)
    base = write_tiny_llama(work / "tiny-llama", data)
    rows, failed = [], False
    for name in args.only or CASES:
        try:
            rows.append(check_case(name, CASES[name], base, data, work))
        except RuntimeError as err:
            print(f"FAIL {name}: {err}", file=sys.stderr)
            rows.append({"method": name, "ok": False})
        failed |= not rows[-1]["ok"]
    print_table(rows)
    refusals = [check_refusal(name, keys, texts, base, data, work) for name, (keys, texts) in REFUSALS.items()]
    print_table(refusals)
    failed |= not all(r["ok"] for r in refusals)
    if not args.skip_bench and not failed:
        timing = bench(args.smollm2.resolve(), work, args.bench_steps)
        (work / "bench.json").write_text(json.dumps(timing, indent=2))
        print_table(timing)
    print("check-axolotl: " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
