"""Parallelism applied from outside to a plain model: `parallel.apply(model, groups, device, ...)`.

The steps run in a fixed order (as torchtitan's `parallelize_llama`):
  tensor (shard attention/MLP over TP) -> pipeline (cut this rank's stages) -> expert (keep this
  rank's experts, all-to-all dispatcher) -> TP token split of MoE layers -> activation
  checkpointing -> data parallel (DDP when there is no TP/PP; else gradients are averaged by
  hand after the step's backward, since pipeline backward passes run outside DDP's hooks).
Pipeline cutting comes before expert sharding so that no rank slices experts it then deletes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from parallel.mesh import ProcessGroups


@dataclass
class Parallelized:
    """This rank's share of a model and how to run it."""

    model: nn.Module  # the plain (pruned, sharded) model: optimizer, checkpoints, MoE layers
    forward_model: nn.Module  # what a non-pipelined forward calls (DDP wrapper or the model)
    groups: ProcessGroups
    pipeline: object | None = None  # parallel.pipeline.Pipeline when pp > 1
    microbatches: int | None = None  # pipeline micro-batches per step (None: the step's micro-batches)

    @property
    def manual_grads(self) -> bool:
        return self.groups.dims.tp > 1 or self.groups.dims.pp > 1

    @property
    def counts_loss(self) -> bool:
        """Whether this rank's loss sums enter the reported totals: one rank per data-parallel
        replica (the last stage, TP rank 0), since the others hold copies or nothing."""
        _, _, tp_rank = self.groups.coords
        return tp_rank == 0 and (self.pipeline is None or self.pipeline.has_last)

    @property
    def counts_moe_stats(self) -> bool:
        """TP ranks see the same routing: only TP rank 0 adds its statistics to the reduction."""
        return self.groups.coords[2] == 0

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Fit an optimizer built over `model` to the layout: torch's foreach kernels refuse a
        parameter group that mixes TP-sharded DTensors and plain tensors (e.g. an MoE layer's
        router and experts beside sharded attention), so such groups take the per-tensor path.
        The groups themselves stay as built, so checkpoints keep the same optimizer structure."""
        from parallel.tensor_parallel import is_sharded

        for group in optimizer.param_groups:
            kinds = {is_sharded(p) for p in group["params"]}
            if len(kinds) > 1 and group.get("foreach") is not False:
                group["foreach"] = False
        return optimizer

    def reduce_grads(self) -> None:
        from parallel.expert_parallel import reduce_expert_grads
        from parallel.grads import average_replicated_grads

        if self.manual_grads:
            average_replicated_grads(self.model, self.groups)
        reduce_expert_grads(self.model)


def apply(model: nn.Module, groups: ProcessGroups, device: torch.device, *, schedule: str = "1f1b",
          microbatches: int | None = None, pp_split: list[int] | None = None,
          activation_checkpointing: bool = False) -> Parallelized:
    """Shard, cut and wrap `model` (built identically on every rank) for this rank's place in the mesh."""
    from parallel.data_parallel import apply_activation_checkpointing, apply_data_parallel
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.grads import tag_norm_copies
    from parallel.pipeline import Pipeline
    from parallel.tensor_parallel import apply_tensor_parallel, install_token_split

    dims = groups.dims
    apply_tensor_parallel(model, groups, device)
    pipeline = Pipeline(model, groups, schedule, device, pp_split) if dims.pp > 1 else None
    apply_expert_parallel(model, groups)
    install_token_split(model, groups)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    par = Parallelized(model=model, forward_model=model, groups=groups, pipeline=pipeline, microbatches=microbatches)
    if par.manual_grads:
        tag_norm_copies(model, groups)
    else:
        par.forward_model = apply_data_parallel(model, device)
    return par
