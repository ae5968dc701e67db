"""One run of the over-parameterization study (``benches/study/study_regime.py``): a fixed, limited training set seen
for several epochs, validation scored after every epoch, the test split scored whenever validation improves
(so the checkpoint that is best on validation has its test score without keeping checkpoints) and at the end.

Two tasks, each through the package's callbacks as users run them:

- ``privacy_qa``: all-MiniLM-L6-v2 (the real pretrained encoder) with a new two-way head on PrivacyQA, the
  transformers ``Trainer``; scores accuracy and cross-entropy (``benches/benchlib/classification.py``).
- ``gsm8k``: SmolLM2-135M-Instruct in 4-bit NF4, TRL's ``SFTTrainer``; scores the answer NLL
  (``benches/benchlib/data.py``). Exact match is left out: this model answers 0-1 of 24 test
  questions whatever the method (BENCHMARKS.md), so it cannot separate anything.

Scores during training are of the training-time model. LoRA-Over's factors are exact reshapes of LoRA factors, so
that is the function its collapse writes; the run checks it once more after the collapse (``collapse_val_diff``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/, where benchlib lives
from benchlib.classification import TARGETS, classify, encode, splits  # noqa: E402
from benchlib.data import (  # noqa: E402
    SPLIT_SEED,
    answer_fits,
    answer_nll,
    batch_order,
    encode_answers,
    gsm8k_rows,
    gsm8k_splits,
    prompt_completion,
    train_rows,
)
from benchlib.methods import (  # noqa: E402
    C3LA_WINDOWS,
    adapter_to_float32,
    finish_run,
    lora_rank,
    method_callback,
    put_first,
    quiet_worker,
    step_clock,
    training_arguments,
)
from benchlib.models import load_causal_base, load_cls_base  # noqa: E402
from study_fold import as_deployed  # noqa: E402

# Arms trained as plain PEFT LoRA with no package callback: LoRA+ (PEFT's optimizer, A and B at different
# rates), rsLoRA (PEFT's use_rslora scaling), and LoRA at twice the rank folded back to the rank by a truncated SVD.
PLAIN_ARMS = ("lora", "loraplus", "rslora", "lora_wide")


def study_callback(method: str, knobs: dict, seed: int):
    """The package's callback for ``method`` with the study's ``knobs`` (LoraOverConfig fields), or ``None``:
    c3LA moves its window every half of the run (two windows, as the quality benchmarks' c3LA)."""
    if method in PLAIN_ARMS:
        return None
    settings = {"chain_interval": 1 / C3LA_WINDOWS} if method == "c3la" else {}
    return method_callback(method, {**settings, **knobs, "seed": seed})


def train_rank(method: str, rank: int) -> int:
    """The LoRA ``r`` an arm trains at: twice the rank for ``lora_wide`` (folded back to ``rank``)."""
    return 2 * rank if method == "lora_wide" else lora_rank(method, rank)


def lora_config(spec: dict, **fields):
    """The arm's PEFT LoraConfig: ``lora_alpha`` twice the trained rank (the scaling 2 whatever the rank; rsLoRA
    divides by its square root instead, as PEFT's ``use_rslora``)."""
    from peft import LoraConfig

    rank = train_rank(spec["method"], spec["rank"])
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, use_rslora=spec["method"] == "rslora", **fields)


def use_loraplus(trainer, spec: dict) -> None:
    """LoRA+: PEFT's optimizer (B's learning rate ``loraplus_ratio`` times A's), AdamW as every other arm's. Set
    before ``train()``, the Trainer keeps it and builds the same cosine schedule around it.

    PEFT puts every 1-D trainable parameter in B's group; here that is the new classifier head's bias (the head is
    in ``modules_to_save``), which would then train 16x faster than the head's weight. It goes back to A's rate, so
    that only the LoRA ``B`` factors differ from plain LoRA, as LoRA+ defines them."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    ratio = spec["knobs"]["loraplus_ratio"]
    optimizer = create_loraplus_optimizer(
        trainer.model, torch.optim.AdamW, lr=spec["lr"], loraplus_lr_ratio=ratio, weight_decay=0.0
    )
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    base = next(g for g in optimizer.param_groups if g["lr"] == spec["lr"])  # A's group
    for group in optimizer.param_groups:
        if group["lr"] == spec["lr"] * ratio:
            stray = [p for p in group["params"] if "lora_B" not in names[id(p)]]
            group["params"] = [p for p in group["params"] if "lora_B" in names[id(p)]]
            base["params"] += stray
    trainer.optimizer = optimizer


def checkpoint_steps(spec: dict) -> set[int]:
    """The evaluations that may choose the checkpoint: every ``steps_per_eval`` steps, and the last step."""
    total = max_steps(spec)
    return {total, *range(spec["steps_per_eval"], total + 1, spec["steps_per_eval"])}


def eval_steps(spec: dict) -> set[int]:
    """The steps validation is scored at: step 0, :func:`checkpoint_steps`, and every ``fine_eval_every`` steps up
    to ``fine_eval_until`` (where validation loss is lowest, for the time-to-target)."""
    total = max_steps(spec)
    steps = {0, *checkpoint_steps(spec)}
    if spec.get("fine_eval_every"):
        steps |= set(range(spec["fine_eval_every"], spec["fine_eval_until"] + 1, spec["fine_eval_every"]))
    return {s for s in steps if s <= total}


def max_steps(spec: dict) -> int:
    """The run's optimizer steps: every epoch of the fixed training set (warm-up 5% of them, cosine decay)."""
    return spec["epochs"] * spec["steps_per_epoch"]


def epoch_order(lengths: list[int], spec: dict) -> list[int]:
    """Row indices for every epoch in turn: each epoch a fresh seeded shuffle (benches' ``batch_order``), the same
    for every method at one seed."""
    order = []
    for epoch in range(spec["epochs"]):
        order += batch_order(lengths, spec["batch"], spec["seed"] * 1000 + epoch)
    return order


def fixed_rows(pool: list[dict], count: int, keep=lambda row: True) -> list[dict]:
    """The study's training set: ``count`` rows of the pool chosen once (fixed shuffle), whatever the seed."""
    return train_rows(pool, f"{SPLIT_SEED}:train", count, keep)


def epoch_evaluator(spec: dict, score_val, score_test, better):
    """A TrainerCallback that scores validation at :func:`eval_steps`, and the test split when a checkpoint
    evaluation (every ``steps_per_eval`` steps) improved and at the last step; ``evals`` holds one dict per
    evaluation (``"checkpoint": False`` for the step-0 and the finer ones, which only trace the loss)."""
    from transformers import TrainerCallback

    steps, checkpoints = eval_steps(spec), checkpoint_steps(spec)

    class EpochEvaluator(TrainerCallback):
        def __init__(self):
            self.evals: list[dict] = []
            self.best: dict | None = None
            self.seconds = 0.0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.evaluate(model, 0, state.max_steps)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in steps:
                self.evaluate(model, state.global_step, state.max_steps)

        def evaluate(self, model, step: int, last: int) -> None:
            began = time.time()
            was_training = model.training
            checkpoint = step in checkpoints
            entry = {"step": step, "epoch": round(step / spec["steps_per_epoch"], 3), **score_val(model)}
            entry["checkpoint"] = checkpoint
            improved = checkpoint and (self.best is None or better(entry, self.best))
            if improved or step == last:
                entry.update(score_test(model))
            if improved:
                self.best = entry
            model.train(was_training)
            self.evals.append(entry)
            self.seconds += time.time() - began

    return EpochEvaluator()


def fit(spec: dict, trainer_factory, rows_count: int) -> dict:
    """Train with the method's callback and the evaluator; the record (and ``_model``)."""
    callback = study_callback(spec["method"], spec["knobs"], spec["seed"])
    clock = step_clock()  # trainable parameters at train begin (LoRA plus the auxiliary cores)
    evaluator, trainer = trainer_factory(callback)
    trainer.add_callback(clock)
    put_first(trainer, callback)
    began = time.time()
    trainer.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    record = {
        "evals": evaluator.evals,
        "best": evaluator.best,
        "last": evaluator.evals[-1],
        "curve": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
        "train": {"seconds": round(time.time() - began - evaluator.seconds, 1), "rows": rows_count},
        "eval_seconds": round(evaluator.seconds, 1),
    }
    if callback is not None and hasattr(callback, "history"):
        layouts = [h for h in callback.history if "aux_params" in h]  # initial, prepass, re-allocations
        record["train"]["aux_params_peak"] = max((h["aux_params"] for h in layouts), default=None)
        record["train"]["reallocations"] = sum(h.get("event") == "reallocate" for h in callback.history)
        collapse = [h for h in callback.history if h.get("event") == "collapse"]
        record["train"]["collapse_max_error"] = collapse[-1]["max_error"] if collapse else None
    # the optimizer's groups as they started: learning rate, tensors, LoRA B tensors among them (LoRA+: A's and B's)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    record["train"]["optimizer_groups"] = [
        {"lr": g.get("initial_lr", g["lr"]), "tensors": len(g["params"]),
         "lora_B": sum("lora_B" in names.get(id(p), "") for p in g["params"])}
        for g in trainer.optimizer.param_groups if g["params"]
    ]  # fmt: skip
    record["train"]["trainable_at_begin"] = clock.trainable
    record["train"]["trainable_after"] = sum(p.numel() for p in params)
    record["_model"] = trainer.model
    return record


def run_privacy_qa(spec: dict) -> tuple[dict, object, object]:
    """MiniLM on PrivacyQA; returns (record, model, evaluator scoring function for the collapse check)."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    pool, val, test = splits(spec)
    base, tokenizer = load_cls_base(spec, spec["seed"])
    val_enc = encode(tokenizer, val, spec["max_length"])
    test_enc = encode(tokenizer, test[: spec["n_test"]], spec["max_length"])
    train_enc = encode(tokenizer, fixed_rows(pool, spec["train_rows"]), spec["max_length"])
    order = epoch_order([len(e["input_ids"]) for e in train_enc], spec)
    lora = lora_config(spec, target_modules=TARGETS, modules_to_save=["classifier"], task_type="SEQ_CLS")

    @as_deployed(spec)
    def score_val(model) -> dict:
        acc, loss = classify(model, tokenizer, val_enc, spec["eval_batch"])
        return {"val_acc": acc, "val_loss": loss}

    @as_deployed(spec)
    def score_test(model) -> dict:
        acc, loss = classify(model, tokenizer, test_enc, spec["eval_batch"])
        return {"test_acc": acc, "test_loss": loss}

    def better(a: dict, b: dict) -> bool:
        return (a["val_acc"], -a["val_loss"]) > (b["val_acc"], -b["val_loss"])

    def factory(callback):
        evaluator = epoch_evaluator(spec, score_val, score_test, better)
        trainer = Trainer(
            model=get_peft_model(base, lora),
            args=training_arguments(TrainingArguments, spec, max_steps(spec), 0.05),
            train_dataset=Dataset.from_list([train_enc[i] for i in order]),
            data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[c for c in (callback, evaluator) if c is not None],
        )
        if spec["method"] == "loraplus":
            use_loraplus(trainer, spec)
        return evaluator, trainer

    record = fit(spec, factory, len(train_enc))
    return record, record.pop("_model"), score_val


def run_gsm8k(spec: dict) -> tuple[dict, object, object]:
    """SmolLM2-135M NF4 SFT on a GSM8K subset; returns (record, model, validation scoring function)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    pool, val = gsm8k_splits(spec["gsm8k_dir"], spec["n_val"])
    test = gsm8k_rows(spec["gsm8k_dir"], "test", spec["n_test"], "--n-test")
    model, tokenizer = load_causal_base(spec)

    rows = fixed_rows(pool, spec["train_rows"], answer_fits(tokenizer, spec["max_length"]))
    order = epoch_order([len(ids) for ids, _ in encode_answers(tokenizer, rows, spec["max_length"])], spec)
    lora = lora_config(spec, target_modules="all-linear", task_type="CAUSAL_LM")

    @as_deployed(spec)
    def score_val(model) -> dict:
        return {"val_nll": answer_nll(model, tokenizer, val, spec["max_length"], spec["eval_batch"])}

    @as_deployed(spec)
    def score_test(model) -> dict:
        return {"test_nll": answer_nll(model, tokenizer, test, spec["max_length"], spec["eval_batch"])}

    def factory(callback):
        evaluator = epoch_evaluator(spec, score_val, score_test, lambda a, b: a["val_nll"] < b["val_nll"])
        trainer = SFTTrainer(
            model=model,
            args=training_arguments(SFTConfig, spec, max_steps(spec), 0.05, bf16=False, max_length=spec["max_length"]),
            train_dataset=Dataset.from_list([prompt_completion(rows[i]) for i in order]),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[c for c in (callback, evaluator) if c is not None],
        )
        if len(trainer.train_dataset) != len(order):
            raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(order)} training rows")
        if spec["method"] == "loraplus":
            use_loraplus(trainer, spec)
        return evaluator, trainer

    record = fit(spec, factory, len(rows))
    return record, record.pop("_model"), score_val


def worker(spec: dict) -> None:
    """Train one arm with its evaluations, check the collapsed adapter scores as the last evaluation, write
    ``spec['out']``."""
    quiet_worker(spec.get("threads", 1))
    began = time.time()
    record, model, score_val = (run_gsm8k if spec["task"] == "gsm8k" else run_privacy_qa)(spec)
    scoring = time.time()
    adapter_to_float32(model)
    after = score_val(model)
    key = next(iter(after))
    record["collapse_val_diff"] = after[key] - record["last"][key]
    if spec["method"] == "lora_wide":  # what the fold costs: the same model unfolded (rank 2r), at the end
        record["unfolded_last"] = score_val.__wrapped__(model)
    finish_run(spec, {"spec": spec, **record}, {k: v for k, v in record["best"].items()}, model, began, scoring)


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
