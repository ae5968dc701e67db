"""cLA, random cLA, c3LA and random c3LA (Beyond LoRA, arXiv 2606.13767): ``A`` a fixed window of input columns.

``config`` (what the user asks), ``model`` (the window and chain layers, install and collapse), ``callback``
(chain steps and checkpoints inside a Trainer run).
"""
