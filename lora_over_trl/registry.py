"""Every method this package trains, in one table: the only place a method's name is mapped to what it is.

The SFT command, the Axolotl plugin, the distributed checks and the benchmarks ask this table; none of them
branches on a method's name. Adding a method means one entry here and the method's own folder.

    >>> from lora_over_trl.registry import METHODS, build_callback
    >>> METHODS["c3la"].section
    'cla'
    >>> callback = build_callback("lora_over", {"schedule": "dynamic"})   # a LoraOverCallback
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["METHODS", "Method", "build_callback", "build_config", "get_method", "load", "refusal", "sections"]

USE_DDP = "launch as DDP instead (`accelerate launch --multi_gpu`, no FSDP or DeepSpeed in its config)"


@dataclass(frozen=True)
class Method:
    """One trainable method and everything the rest of the package needs to know about it.

    Args:
        name: the recipe's ``method:`` value (and the Axolotl plugin's ``lora_over_method:``).
        label: its name in prose and tables.
        help: one line for ``--help`` and the docs.
        section: the recipe section holding its settings (``--SECTION.KEY value`` flags); ``None``: no settings.
        config: ``"module:Class"`` of its config dataclass (imported on first use); ``None``: plain LoRA.
        callback: ``"module:Class"`` of its Trainer callback, built from the config.
        variant: the config's ``method`` field names the variant (the cLA family shares one section).
        axolotl_section: the Axolotl plugin's key for the section; ``None``: the plugin takes no settings for it.
        axolotl_refusal: why the Axolotl plugin does not offer it (``None``: offered).
        replaces_lora_a: what it does to ``lora_A`` that discards a loaded adapter (``None``: it keeps it).
        artifact: the folder that holds the trained function and that evaluation scores (``adapter`` or ``merged``).
        held_out: the share of the training rows it holds out for scoring after training when the recipe gives no
            evaluation split, read from its config (GLoRA's search); ``None``: it needs none.
        outputs: ``(file, what it holds)`` for each file its callback or its ``finish`` writes into the output folder.
        finish: ``"module:function"`` called as ``finish(trainer, output_dir=...)`` on the main process after
            training (GLoRA's search).
        save: ``"module:function"`` that writes the run's folders instead of the default ``adapter/`` (and
            ``merged/``): ``save(trainer, tokenizer, output_dir)``.
        fsdp2: why it cannot train under FSDP2 (``None``: it can).
        fsdp2_wrapped: why it cannot train under FSDP2 on PEFT's parameter-wrapping layers (``target_parameters``:
            MoE experts), known once the model is built (``None``: it can, where :attr:`fsdp2` allows).
        deepspeed: why it cannot train under DeepSpeed ZeRO-1/2 (``None``: it can).
        unused_parameters: whether, with this config, some trainable weights get no gradient in a step (DDP must
            then be told to look for unused parameters).
    """

    name: str
    label: str
    help: str
    section: str | None = None
    config: str | None = None
    callback: str | None = None
    variant: bool = False
    axolotl_section: str | None = None
    axolotl_refusal: str | None = None
    replaces_lora_a: str | None = None
    artifact: str = "adapter"
    held_out: Callable[[Any], float] | None = None
    outputs: tuple[tuple[str, str], ...] = ()
    finish: str | None = None
    save: str | None = None
    fsdp2: str | Callable[[Any], str | None] | None = None
    fsdp2_wrapped: str | None = None
    deepspeed: str | Callable[[Any], str | None] | None = None
    unused_parameters: Callable[[Any], bool] = lambda config: False

    @property
    def output_files(self) -> tuple[str, ...]:
        """The names of :attr:`outputs`."""
        return tuple(name for name, _ in self.outputs)

    def config_class(self) -> type | None:
        return load(self.config) if self.config else None

    def callback_class(self) -> type | None:
        return load(self.callback) if self.callback else None


def load(path: str) -> Any:
    """The object a ``"module:name"`` path names, imported now."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _lora_over_deepspeed(config: Any) -> str | None:
    if config.schedule == "static":
        return None
    return (
        f"lora_over.schedule: {config.schedule!r} under {{mode}} is not supported: a re-allocation moves the bank's "
        "values and Adam moments in place, and ZeRO keeps the moments in its own partitions and copies its master "
        "weights back over the parameters after every step; use schedule: static"
    )


_CHAIN = "the chain freezes and restarts B in place and resets its optimizer state between steps"
_CHAIN_WRAPPED = (
    "on a parameter-wrapping layer the chain replaces lora_A's weight by a wider one at every step, while FSDP2 "
    "keeps gathering the one it sharded (the next forward fails on mismatched shapes)"
)
_GLORA = "GLoRA's supernet rewrites the LoRA weights outside a forward and its search runs on one process"
_CLA = dict(
    section="cla",
    config="lora_over_trl.methods.cla.config:ClaConfig",
    callback="lora_over_trl.methods.cla.callback:ClaCallback",
    variant=True,
    axolotl_section="lora_over_cla",
    replaces_lora_a="replaces lora_A by a column window",
)
_CHAINED = dict(deepspeed=_CHAIN, fsdp2_wrapped=_CHAIN_WRAPPED, **_CLA)

METHODS: dict[str, Method] = {
    method.name: method
    for method in [
        Method(
            "lora_over",
            "LoRA-Over",
            "over-parameterized factors (tensor-train cores), collapsed to a standard LoRA adapter at the end",
            section="lora_over",
            config="lora_over_trl.lora_over.config:LoraOverConfig",
            callback="lora_over_trl.lora_over.callback:LoraOverCallback",
            axolotl_section="lora_over",
            outputs=(
                ("lora_over_history.json", "the schedule's decisions, step by step"),
                ("lora_over_allocation.png", "which modules held capacity when"),
            ),
            deepspeed=_lora_over_deepspeed,
        ),
        Method("lora", "LoRA", "plain LoRA, as PEFT trains it (the baseline)"),
        Method("cla", "cLA", "A a fixed window of r input columns (offset 0); only B trains", **_CLA),
        Method("rcla", "random cLA", "cLA at a seeded random window offset per module", **_CLA),
        Method("c3la", "c3LA", "chained cLA: windows 0, r, 2r, ... trained in turn", **_CHAINED),
        Method("rc3la", "random c3LA", "chained cLA, windows in a seeded random order", **_CHAINED),
        Method(
            "glora",
            "GLoRA",
            "supernet of support tensors, evolutionary search after training, merged at the end",
            section="glora",
            config="lora_over_trl.methods.glora.config:GloraConfig",
            callback="lora_over_trl.methods.glora.callback:GloraCallback",
            axolotl_refusal="its result is a merged model chosen by a search after training, not the PEFT adapter "
            "Axolotl saves; train it with `python -m lora_over_trl.sft` and `method: glora`",
            artifact="merged",
            held_out=lambda config: config.search_fraction,
            outputs=(("glora_search.json", "the search's generations and the chosen configuration"),),
            finish="lora_over_trl.methods.glora.callback:search_glora",
            save="lora_over_trl.methods.glora.export:save_glora_outputs",
            fsdp2=_GLORA,
            deepspeed=_GLORA,
            unused_parameters=lambda config: True,
        ),
    ]
}


def get_method(name: str) -> Method:
    """The entry for ``name``.

    Raises:
        ValueError: ``method: 'x' is not one of [...]``.
    """
    if name not in METHODS:
        raise ValueError(f"method: {name!r} is not one of {list(METHODS)}")
    return METHODS[name]


def sections() -> list[str]:
    """The recipe sections of all methods, in table order (``lora_over``, ``cla``, ``glora``)."""
    return list(dict.fromkeys(m.section for m in METHODS.values() if m.section))


def build_config(name: str, settings: dict[str, Any] | None = None) -> Any:
    """The method's config from its section's settings (``None`` for plain LoRA).

    Raises:
        ValueError: a bad setting, from the config's own checks; a cLA variant set inside the section.
    """
    method = get_method(name)
    cls = method.config_class()
    if cls is None:
        return None
    settings = dict(settings or {})
    if method.variant:
        if "method" in settings:
            raise ValueError("set the variant with the top-level `method`, not inside `cla:`")
        settings["method"] = name
    return cls.from_dict(settings)


def build_callback(name: str, config: Any = None) -> Any:
    """The method's Trainer callback (``None`` for plain LoRA); ``config`` is its config or a dict of settings."""
    method = get_method(name)
    if method.callback is None:
        return None
    if config is None or isinstance(config, dict):
        config = build_config(name, config)
    return method.callback_class()(config)


def refusal(name: str, config: Any, mode: Any, wrapped: bool = False) -> str | None:
    """Why ``name`` (with ``config``) cannot train under the sharded ``mode``, and the alternative; else ``None``.

    ``mode`` is a :class:`lora_over_trl.utils.distributed.ShardedMode` or ``None`` (DDP or one process); ``wrapped``:
    the model has PEFT's parameter-wrapping LoRA layers (``target_parameters``), which a callback knows once the
    model is built. The message starts with the recipe key it is about (``method`` or ``lora_over.schedule``).
    """
    method = get_method(name)
    if mode is None or method.callback is None:
        return None
    if mode.kind == "fsdp" and mode.level != 2:
        return f"method: {name!r} under FSDP{mode.level} is not supported; set fsdp_version: 2, or {USE_DDP}"
    if mode.kind == "deepspeed" and mode.level >= 3:
        return (
            f"method: {name!r} under {mode.label} is not supported: ZeRO-3 empties every parameter outside its "
            f"module's forward, and this method reads and rewrites LoRA weights there; use ZeRO-2 "
            f"(zero_stage: 2) with plain LoRA or LoRA-Over's static schedule, or {USE_DDP}"
        )
    if mode.kind == "fsdp" and wrapped and method.fsdp2_wrapped:
        why = method.fsdp2_wrapped
        return f"method: {name!r} with target_parameters under {mode.label} is not supported: {why}; {USE_DDP}"
    limit = method.fsdp2 if mode.kind == "fsdp" else method.deepspeed
    why = limit(config) if callable(limit) else limit
    if why is None:
        return None
    if callable(limit):  # the reason names its own key
        return f"{why.format(mode=mode.label)}, or {USE_DDP}"
    return f"method: {name!r} under {mode.label} is not supported: {why}; {USE_DDP}"
