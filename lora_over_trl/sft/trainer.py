"""The SFT command's model and trainer: the base (4-bit when asked) with its tokenizer, and TRL's ``SFTTrainer``."""

from __future__ import annotations

from typing import Any

from lora_over_trl.sft.checks import RecipeError
from lora_over_trl.utils.bnb_cpu import keep_cpu_4bit_layout
from lora_over_trl.utils.errors import first_line

__all__ = ["build_trainer", "load_model_and_tokenizer"]


def load_model_and_tokenizer(model_args: Any, training_args: Any):
    """The base model (4-bit NF4 when asked) and its tokenizer; errors name ``model_name_or_path``."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    path = model_args.model_name_or_path
    quantization = get_quantization_config(model_args)
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": model_args.model_revision}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        on_gpu = torch.cuda.is_available() and not training_args.use_cpu
        kwargs["device_map"] = {"": PartialState().local_process_index} if on_gpu else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise RecipeError(f"model_name_or_path: cannot load {path!r}: {first_line(err)}") from err
    if quantization is not None and training_args.use_cpu:
        keep_cpu_4bit_layout(model)
    return model, tokenizer


def build_trainer(model, tokenizer, train, test, training_args, model_args, method: str, method_config):
    """``SFTTrainer`` with the LoRA config from the recipe and the method's callback (the registry's), running first."""
    from trl import SFTTrainer, get_peft_config

    from lora_over_trl.registry import build_callback

    model_args.use_peft = True  # this command always trains an adapter
    callback = build_callback(method, method_config)
    callbacks = [] if callback is None else [callback]
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )
    if callback is not None:  # first, so reporting integrations see the `lora_over/*` keys it adds at on_log
        trainer.callback_handler.callbacks.remove(callback)
        trainer.callback_handler.callbacks.insert(0, callback)
    return trainer, callback
