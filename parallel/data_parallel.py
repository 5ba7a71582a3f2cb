"""Data parallelism and activation checkpointing, applied from outside to a plain model.

Order matters (as in torchtitan): activation checkpointing wraps blocks first, then the whole
model is wrapped for data parallelism.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.nn.parallel import DistributedDataParallel


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every block of `model.layers` in backward instead of storing its activations.

    The wrapper strips its own prefix in `state_dict`, so checkpoint keys do not change.
    """
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return model


def apply_data_parallel(model: nn.Module, device: torch.device, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Average gradients over `group` (default: all ranks) with DDP; identity on one rank.

    NOTE: DDP averages every parameter over the whole group; expert parallelism will exclude
    expert weights and reduce them over their expert-data-parallel group instead.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model
