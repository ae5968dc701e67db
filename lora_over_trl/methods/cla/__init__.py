"""cLA, random cLA, c3LA and random c3LA (Beyond LoRA, arXiv 2606.13767): ``A`` a fixed window of input columns.

``config`` (what the user asks), ``model`` (the window and chain layers, install and collapse), ``experts`` (the
same on PEFT's parameter-wrapping layers: fused MoE experts, routers), ``callback`` (chain steps and checkpoints
inside a Trainer run).
"""
