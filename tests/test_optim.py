"""sync_optimizer: the optimizer follows a model whose trainable parameters change, schedules stay valid."""

from __future__ import annotations

import torch
from torch import nn

from lora_over_trl.lora_over.optim import group_index, sync_optimizer


def test_parameters_join_and_leave_groups_in_model_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    optimizer = torch.optim.AdamW(
        [{"params": [model[0].weight, model[1].weight]}, {"params": [model[0].bias, model[1].bias], "weight_decay": 0}],
        lr=1e-2,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: 1 - s / 10, lambda s: 1.0])
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    schedule.step()
    assert model[0].weight in optimizer.state

    # model[0].weight stops training (as a parametrized LoRA weight does); a new parameter replaces it
    model[0].weight.requires_grad_(False)
    model[0].extra = nn.Parameter(torch.randn(4, 4))
    old_index = group_index(optimizer, model[0].weight)
    sync_optimizer(optimizer, model, {id(model[0].extra): old_index})
    ids = [[id(p) for p in group["params"]] for group in optimizer.param_groups]
    assert ids == [[id(model[0].extra), id(model[1].weight)], [id(model[0].bias), id(model[1].bias)]]  # model order
    assert model[0].weight not in optimizer.state  # its moments are gone with it
    assert group_index(optimizer, model[0].extra) == 0 and group_index(optimizer, model[0].bias) == 1

    (model(torch.randn(3, 4)).sum() + model[0].extra.sum()).backward()
    optimizer.step()
    schedule.step()  # still one lambda per group: nothing to patch in the schedule
    assert model[0].extra in optimizer.state and len(schedule.get_last_lr()) == 2
    assert optimizer.param_groups[0]["lr"] == 1e-2 * (1 - 2 / 10)  # the new parameter follows its group's schedule
