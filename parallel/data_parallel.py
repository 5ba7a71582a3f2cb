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

    Expert weights sharded by expert parallelism are left out: they are reduced over their
    expert-data-parallel group by `parallel.expert_parallel.reduce_expert_grads`.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return model
    from parallel.expert_parallel import expert_param_names

    # Expert-parallel weights are reduced over their own group (parallel.expert_parallel).
    ignored = expert_param_names(model)
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model
