"""Let accelerate run FSDP on CPU processes (gloo), for tests/test_distributed.py only.

accelerate 1.16 switches a launch with ``distributed_type: FSDP`` to FSDP only in its GPU branch
(``AcceleratorState.__init__``: the ``MULTI_GPU``-like types); a CPU process group stays ``MULTI_CPU`` and the
Trainer wraps the model in DDP, so an FSDP launch on CPU silently tests DDP. The test puts this folder on
``PYTHONPATH``; Python imports ``sitecustomize`` at start-up in every process the launcher starts, and this makes
the one assignment accelerate's GPU branch makes (``distributed_type = FSDP``, ``fsdp_plugin = ...``). Everything
after it is accelerate's, transformers' and torch's own FSDP2 code: ``fully_shard`` of each decoder layer and of
the root, DTensor parameters, full-state-dict checkpoints, sharded optimizer state.
"""

import os

if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    from accelerate import state as _state
    from accelerate.utils import DistributedType

    _init = _state.AcceleratorState.__init__

    def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            _state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    _state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
