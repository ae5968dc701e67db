"""LoRA-Over: each LoRA factor trained as a tensor-train (MPO) of cores, collapsed to plain LoRA at the end.

The layers, bottom up (each imports only those before it):

- ``mpo``: the tensor-train math, pure torch (contract, decompose, grow, truncate);
- ``bank``: every over-parameterized factor of one layout in one stored tensor, contracted in one batched op;
- ``model``: the PEFT hook: install, move and collapse factors through one primitive, ``set_layouts``;
- ``optim``, ``checkpoint``: the optimizer and the checkpoint files follow the factors;
- ``schedule/``: which modules get capacity (pure decisions, and the ``CapacityScheduler`` state machine);
- ``callback``: ``LoraOverCallback``, which only translates Trainer events into the above.
"""
