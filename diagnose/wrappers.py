"""What the monitor sees through: the user's module and optimizer under framework wrappers, and the
process's place in a distributed job."""
from __future__ import annotations

import os

import torch
import torch.nn as nn


def dist_info() -> tuple[int, int]:
    """(rank, world size): torch.distributed when initialised, else the launcher's RANK / WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP / DataParallel / torch.compile wrappers (hooks go on it)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def unwrap_optimizer(optimizer):
    """The torch optimizer whose `step` really runs (accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer wrap one; their own `step` may skip it, e.g. while accumulating gradients)."""
    for attr in ("optimizer", "_optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            return unwrap_optimizer(inner)
    return optimizer
