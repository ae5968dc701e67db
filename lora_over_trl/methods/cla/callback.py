"""cLA / random cLA / c3LA / random c3LA in any ``Trainer`` or TRL ``SFTTrainer`` run: one callback.

    trainer = SFTTrainer(..., peft_config=LoraConfig(r=16, ...), callbacks=[ClaCallback(ClaConfig(method="c3la"))])

- ``on_init_end``: ``A`` becomes a fixed window (a gather), ``B`` restarts at zero, before the optimizer
  exists (so ``A`` never enters it).
- ``on_step_end`` / ``on_epoch_end`` (c3la, rc3la): every ``chain_interval`` steps or epochs, the current
  ``B A`` is frozen, the window moves on and ``B`` restarts at zero with fresh optimizer state.
- ``on_save``: ``checkpoint-N/cla_chain.json`` + ``cla_chain.safetensors`` (chain position, frozen ``B``s);
  a resumed run rebuilds the chain before the Trainer loads the adapter (the same ``load_adapter`` hook as
  LoRA-Over). Under FSDP the Trainer resumes through accelerate's loader instead, which restores ``B`` (and the
  selector) but not the chain: ``on_train_begin`` rebuilds it then, leaving the loaded ``B`` as it is.
- ``on_train_end``: collapse to a standard PEFT LoRA adapter of rank ``windows x r``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from lora_over_trl.methods.cla.config import ClaConfig
from lora_over_trl.methods.cla.experts import chain_holder, reads_weights, trained_b
from lora_over_trl.methods.cla.model import collapse_cla, install_cla, next_window, restore_chain
from lora_over_trl.registry import refusal
from lora_over_trl.utils.callbacks import ScheduleSetupError, restore_before_load
from lora_over_trl.utils.distributed import launch_mode
from lora_over_trl.utils.fields import resolve_phase
from lora_over_trl.utils.peft_layers import lora_modules

__all__ = ["ClaCallback", "CHAIN_FILE", "CHAIN_TENSORS"]

CHAIN_FILE = "cla_chain.json"
CHAIN_TENSORS = "cla_chain.safetensors"
logger = logging.getLogger(__name__)


class ClaCallback(TrainerCallback):
    """Install cLA (or a chained variant), move the chain, and collapse it inside a Trainer run.

    Args:
        config: the :class:`ClaConfig`.

    Raises:
        ScheduleSetupError: at ``on_init_end`` when the model has no LoRA layers, or the run is sharded in a way
            the method cannot train under (:func:`lora_over_trl.registry.refusal`).
    """

    def __init__(self, config: ClaConfig) -> None:
        self.config = config
        self.offsets: dict[str, list[int]] = {}  # window offsets each module visits, in order
        self.position = 0  # chain steps taken
        self.rank: int | None = None  # adapter rank after the collapse
        self.model = None
        self.optimizer = None
        self.every: int | None = None  # chain_interval in steps or epochs, resolved against the run at its start
        self._chain_restored = False  # a checkpoint's chain was rebuilt (resume through `load_adapter`)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        layers = lora_modules(model, self.config.adapter_name)
        wrapped = any(reads_weights(layer) for layer in layers.values())
        refused = refusal(self.config.method, self.config, launch_mode(args), wrapped=wrapped)
        if refused:
            raise ScheduleSetupError(f"ClaCallback: {refused}")
        if not layers:
            raise ScheduleSetupError(
                "ClaCallback: the model has no LoRA layers; pass peft_config=LoraConfig(...) to the trainer"
            )
        self.model = model
        self.offsets = install_cla(model, self.config)
        restore_before_load(model, self._restore_chain)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = optimizer
        config = self.config
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" if state.global_step > 0 else None
        if folder is not None and not self._chain_restored and (folder / CHAIN_FILE).is_file():
            # Under FSDP the Trainer resumes through accelerate's loader, not `load_adapter`, so the hook never ran:
            # B (sharded) and the selector hold the checkpoint's values already; the chain's position, windows and
            # frozen B's come from its chain file (restoring them leaves B as loaded)
            self._restore_chain(folder)
        if config.chained:
            total = state.max_steps if config.chain_unit == "steps" else math.ceil(state.num_train_epochs)
            self.every = resolve_phase(config.chain_interval, total, minimum=1)
            logger.info(
                "%s: a new window every %d %s (chain_interval %s of %d %s)",
                config.method,
                self.every,
                config.chain_unit,
                config.chain_interval,
                total,
                config.chain_unit,
            )

    def on_step_end(self, args, state, control, **kwargs):
        config = self.config
        if config.chained and config.chain_unit == "steps" and state.global_step < state.max_steps:
            if state.global_step % self.every == 0:
                self._advance()

    def on_epoch_end(self, args, state, control, **kwargs):
        config = self.config
        if config.chained and config.chain_unit == "epochs" and state.global_step < state.max_steps:
            if round(state.epoch) % self.every == 0:
                self._advance()

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.config.chained:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        layers = lora_modules(self.model, self.config.adapter_name)
        adapter = self.config.adapter_name
        tensors = {name: chain_holder(layer.lora_B[adapter]).frozen.contiguous() for name, layer in layers.items()}
        save_file(tensors, folder / CHAIN_TENSORS)
        (folder / CHAIN_FILE).write_text(json.dumps({"method": self.config.method, "position": self.position}))

    def on_train_end(self, args, state, control, **kwargs):
        if self.config.collapse_on_train_end:
            self.rank = collapse_cla(self.model, self.config.adapter_name)

    def run_summary(self) -> dict[str, Any]:
        """The SFT command's ``summary.json`` fields of this run: the collapsed rank, windows visited, chain step."""
        return {"cla": {"rank": self.rank, "windows": self.position + 1, "chain_every": self.every}}

    def _restore_chain(self, folder: Path) -> None:
        """Rebuild the chain recorded in a checkpoint (nothing for a checkpoint without one)."""
        if not (folder / CHAIN_FILE).is_file():
            return
        recorded = json.loads((folder / CHAIN_FILE).read_text())
        if recorded["method"] != self.config.method:
            raise ValueError(f"{folder} holds a {recorded['method']} chain, not {self.config.method}")
        frozen = load_file(folder / CHAIN_TENSORS)
        self.position = recorded["position"]
        self._chain_restored = True
        for name, layer in lora_modules(self.model, self.config.adapter_name).items():
            restore_chain(layer, self.config.adapter_name, self.offsets[name], self.position, frozen[name])

    def _advance(self) -> None:
        """One chain step in every module; ``B``'s Adam moments belong to the window it leaves.

        Popping ``B``'s optimizer state makes the optimizer start it afresh at its next step (step 0, zero moments
        created like the parameter: under FSDP2 sharded DTensors like it)."""
        self.position += 1
        adapter = self.config.adapter_name
        for name, layer in lora_modules(self.model, adapter).items():
            offsets = self.offsets[name]
            next_window(layer, adapter, offsets[self.position % len(offsets)])
            if self.optimizer is not None:  # (accelerate's wrapper: its `state` is the wrapped optimizer's)
                self.optimizer.state.pop(trained_b(layer.lora_B[adapter]), None)
