"""One rank of a multi-process SFTTrainer run with LoraOverCallback (launched by test_callback.py via torchrun).

Writes ``rank<R>-<schedule>.json`` with the world size, a hash of every trainable parameter, the losses and the
allocation history, so the test can check that the ranks agree. Several schedules, comma-separated, train one after
the other in the same launch (a launch's start costs more than one of these tiny runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import gsm8k_dataset, load_base, lora_config, sft_args  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import SFTTrainer  # noqa: E402

from lora_over_trl import LoraOverCallback, LoraOverConfig  # noqa: E402
from lora_over_trl.sft.run import end_process_group  # noqa: E402


def main(base: str, tokenizer_dir: str, out: str, schedules: str) -> None:
    """Train each schedule in turn."""
    for schedule in schedules.split(","):
        train(base, tokenizer_dir, out, schedule)


def train(base: str, tokenizer_dir: str, out: str, schedule: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = gsm8k_dataset(32)
    runtime = schedule != "static"
    args = sft_args(
        out,
        max_steps=6 if runtime else 3,
        save_strategy="no",
        max_length=64,
        activation_checkpointing=False,
        ddp_find_unused_parameters=False,
    )
    extra = {"budget_ratio": 0.3, "interval": 2, "warmup_steps": 1, "prepass_batches": 2} if runtime else {}
    callback = LoraOverCallback(LoraOverConfig(capacity=1.0, schedule=schedule, collapse_on_train_end=False, **extra))
    trainer = SFTTrainer(
        model=load_base(base, "fp32"),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config(),
        callbacks=[callback],
    )
    trainer.train()
    digest = hashlib.sha256()
    for _, param in trainer.model.named_parameters():  # cores and plain LoRA weights alike
        if param.requires_grad:
            digest.update(param.detach().numpy().tobytes())
    rank = int(os.environ.get("RANK", "0"))
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    history = [sorted(h.get("modules", [])) for h in callback.history]
    result = {
        "rank": rank,
        "world": trainer.args.world_size,
        "hash": digest.hexdigest(),
        "losses": losses,
        "history": history,
    }
    (Path(out) / f"rank{rank}-{schedule}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:5])
    end_process_group()  # before exit: a live gloo group can abort the process at interpreter teardown
