"""LoRA-Over, cLA and c3LA inside an Axolotl run: an Axolotl plugin around the project's Trainer callbacks.

    plugins:
      - lora_over_trl.integrations.axolotl.LoraOverPlugin
    adapter: qlora
    lora_over_method: lora_over
    lora_over: {schedule: dynamic, budget_ratio: 0.5}
    lora_mlp_kernel: false          # and lora_qkv_kernel, lora_o_kernel, lora_embedding_kernel

    AXOLOTL_DO_NOT_TRACK=1 axolotl train config.yml

Axolotl builds the model and its PEFT LoRA adapter as usual; the plugin only hands the method's callback
(:class:`~lora_over_trl.LoraOverCallback` or :class:`~lora_over_trl.ClaCallback`) to the Trainer's constructor.
From there the callback does what it does in the SFT command: it installs the over-parameterized factors at
``on_init_end`` (before the optimizer exists), schedules them, writes its state next to each ``checkpoint-N/``
and rebuilds it on ``resume_from_checkpoint`` before the Trainer loads the adapter, and collapses at
``on_train_end``. Axolotl's own save then writes a standard PEFT LoRA adapter to ``output_dir``.

The keys and the config-time refusals live in :mod:`lora_over_trl.integrations.axolotl.args`. GLoRA is refused
there: its result is a searched, merged model, not an adapter.
"""

from __future__ import annotations

import logging
from typing import Any

from axolotl.integrations.base import BasePlugin

from lora_over_trl.integrations.axolotl.args import LoraOverArgs, method_config

__all__ = ["LoraOverArgs", "LoraOverPlugin"]

logger = logging.getLogger(__name__)


class LoraOverPlugin(BasePlugin):
    """Axolotl plugin: trains the adapter with LoRA-Over or a cLA-family method and saves it collapsed.

    Keys (see :class:`~lora_over_trl.integrations.axolotl.args.LoraOverArgs`): ``lora_over_method``,
    ``lora_over`` (:class:`~lora_over_trl.LoraOverConfig` fields), ``lora_over_cla``
    (:class:`~lora_over_trl.ClaConfig` fields).

    Example:
        ``plugins: [lora_over_trl.integrations.axolotl.LoraOverPlugin]`` in the YAML, then ``axolotl train``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.callback = None  # the method's callback, once the Trainer is about to be built

    def get_input_args(self) -> str:
        return "lora_over_trl.integrations.axolotl.args.LoraOverArgs"

    def post_model_load(self, cfg: Any, model: Any) -> None:
        """A 4-bit base on CPU keeps its layout (else bitsandbytes repacks it at the first eval forward and the
        next checkpoint writes it back inexactly: see :func:`lora_over_trl.keep_cpu_4bit_layout`)."""
        import torch

        if cfg.load_in_4bit and not torch.cuda.is_available():
            from lora_over_trl.utils.bnb_cpu import keep_cpu_4bit_layout

            keep_cpu_4bit_layout(model)

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        """The method's callback, given to the Trainer's constructor so that its ``on_init_end`` runs there."""
        from lora_over_trl.registry import build_callback

        config = method_config(cfg.get)  # validated already at config time; rebuilt from the same keys
        if config is None:
            return []
        self.callback = build_callback(cfg.lora_over_method or "lora_over", config)
        logger.info("lora_over_trl: %s with %s", cfg.lora_over_method, config)
        return [self.callback]

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """Put the callback first, so reporting integrations see the ``lora_over/*`` keys it adds at ``on_log``."""
        callbacks = trainer.callback_handler.callbacks
        if self.callback is not None and self.callback in callbacks:
            callbacks.remove(self.callback)
            callbacks.insert(0, self.callback)
