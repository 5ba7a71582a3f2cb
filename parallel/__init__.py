"""Parallelism applied from outside to a plain model: `parallel.apply(model, groups, device, ...)`.

The steps run in a fixed order (as torchtitan's `parallelize_llama`):
  tensor (shard attention/MLP over TP) -> pipeline (cut this rank's stages) -> expert (keep this
  rank's experts, all-to-all dispatcher) -> TP token split of MoE layers -> activation
  checkpointing -> compile (`train.compile`: each block in place, MoE layers eager; parallel.compile)
  -> data parallel: FSDP2 when `fsdp` is set (parallel.fsdp: dense weights sharded
  over the data-parallel ranks, experts over their expert group), else DDP when there is no TP/PP,
  else gradients averaged by hand after the step's backward (pipeline backward passes run outside
  DDP's hooks).
Pipeline cutting comes before expert sharding so that no rank slices experts it then deletes.
`apply` also installs the MoE layers' per-step hooks (`moe.step.MoEStep`), so the training step
calls the same few methods of `Parallelized` whatever the model and the layout:
`set_loss_weight`, `no_sync`, `reduce_grads`, `step_metrics` (and `prepare_optimizer` once).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from moe.layer import moe_layers
from moe.step import MoEStep
from parallel.mesh import ParallelDims, ProcessGroups


@dataclass
class Parallelized:
    """This rank's share of a model and how to run it."""

    model: nn.Module  # the plain (pruned, sharded) model: optimizer, checkpoints, MoE layers
    forward_model: nn.Module  # what a non-pipelined forward calls (DDP wrapper or the model)
    groups: ProcessGroups
    pipeline: object | None = None  # parallel.pipeline.Pipeline when pp > 1
    microbatches: int | None = None  # pipeline micro-batches per step (None: the step's micro-batches)
    moe: MoEStep | None = None  # the MoE layers' per-step hooks (None: no MoE layer in the model)
    fsdp: bool = False  # parameters are FSDP2 shards: FSDP reduces the gradients in backward

    @property
    def manual_grads(self) -> bool:
        return self.groups.dims.tp > 1 or self.groups.dims.pp > 1

    @property
    def counts_loss(self) -> bool:
        """Whether this rank's loss sums enter the reported totals: one rank per data-parallel
        replica (the last stage, TP rank 0), since the others hold copies or nothing."""
        _, _, tp_rank = self.groups.coords
        return tp_rank == 0 and (self.pipeline is None or self.pipeline.has_last)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Fit an optimizer built over `model` to the layout (idempotent): torch's foreach kernels
        refuse a parameter group that mixes TP-sharded DTensors and plain tensors (e.g. an MoE
        layer's router and experts beside sharded attention), so such groups take the per-tensor
        path; the groups themselves stay as built, so checkpoints keep the same optimizer
        structure. Also hooks the MoE statistics reduction and bias update onto its step."""
        from parallel.tensor_parallel import is_sharded

        for group in optimizer.param_groups:
            kinds = {is_sharded(p) for p in group["params"]}
            if len(kinds) > 1 and group.get("foreach") is not False:
                group["foreach"] = False
        if self.moe is not None:
            self.moe.attach(optimizer)
        return optimizer

    def set_loss_weight(self, weight: float) -> None:
        """The weight of the coming micro-batch's loss in the step (its share x the loss scale);
        the MoE layers weight their auxiliary losses with it."""
        if self.moe is not None:
            self.moe.set_loss_weight(weight)

    def no_sync(self, last: bool):
        """Gradient accumulation: skip DDP's all-reduce (FSDP's reduce-scatter) except on the step's
        last micro-batch. (Under a pipeline the schedule switches FSDP itself.)"""
        if self.fsdp and not last and self.pipeline is None:
            from parallel.fsdp import no_sync

            return no_sync(self.forward_model)
        if last or not hasattr(self.forward_model, "no_sync"):
            return contextlib.nullcontext()
        return self.forward_model.no_sync()

    def reduce_grads(self) -> None:
        """Finish the step's gradient reduction, whatever the layout. Plain data parallelism has
        reduced the dense gradients already, overlapped with backward (DDP's buckets); TP/PP
        layouts average them over their data-parallel group here; expert gradients are reduced
        over their expert-data-parallel group."""
        from parallel.expert_parallel import reduce_expert_grads
        from parallel.grads import average_replicated_grads
        from parallel.pipeline import sync_tied_embedding

        if self.fsdp:  # FSDP reduced every sharded gradient; left: the tied copies, plain experts
            sync_tied_embedding(self.model, self.groups)
        elif self.manual_grads:
            average_replicated_grads(self.model, self.groups)
        reduce_expert_grads(self.model)

    def step_metrics(self) -> dict:
        """The MoE statistics of the step just finished, reduced over ranks ({} without MoE)."""
        return self.moe.summary() if self.moe is not None else {}


def _moe_step(model: nn.Module, groups: ProcessGroups, device: torch.device) -> MoEStep | None:
    """The MoE hooks, with the layout of the whole model (taken before any pipeline cut)."""
    layers = moe_layers(model)
    if not layers:
        return None
    return MoEStep(model, [layer.layer_id for layer in layers], layers[0].cfg.num_experts, device,
                   counts_stats=groups.coords[2] == 0)


def local(model: nn.Module) -> Parallelized:
    """A model used as it is (one process, or a DDP module built by hand), with the same
    interface as `apply`'s result. Cached on the model, so its MoE hooks are installed once."""
    if isinstance(model, Parallelized):
        return model
    cached = model.__dict__.get("_raymoe_local")
    if cached is not None:
        return cached
    from parallel.data_parallel import unwrap

    plain = unwrap(model)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    groups = ProcessGroups(dims=ParallelDims(world=world, dp=world), rank=rank, ep=None, edp=None)
    par = Parallelized(model=plain, forward_model=model, groups=groups)
    layers = moe_layers(plain)
    if layers:
        par.moe = MoEStep(plain, [layer.layer_id for layer in layers], layers[0].cfg.num_experts,
                          next(plain.parameters()).device)
    model.__dict__["_raymoe_local"] = par
    return par


def apply(model: nn.Module, groups: ProcessGroups, device: torch.device, *, schedule: str = "1f1b",
          microbatches: int | None = None, pp_split: list[int] | None = None,
          activation_checkpointing: bool = False, fsdp: bool | int = False, reshard_after_forward: bool = True,
          precision: str = "fp32", ep_overlap_chunks: int = 1, compile: bool = False) -> Parallelized:
    """Shard, cut and wrap `model` (built identically on every rank) for this rank's place in the mesh."""
    from parallel.data_parallel import apply_activation_checkpointing, apply_data_parallel
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.fsdp import apply_fsdp, build_device_mesh, fsdp_degree, plan
    from parallel.grads import tag_norm_copies
    from parallel.pipeline import Pipeline
    from parallel.tensor_parallel import apply_tensor_parallel, install_token_split

    dims = groups.dims
    moe = _moe_step(model, groups, device)  # the whole model's MoE layout, before the cut
    degree = fsdp_degree(fsdp, dims.dp)
    if degree:  # before TP: TP's DTensors must live on the same root mesh as FSDP's
        groups.device_mesh = build_device_mesh(groups, device, degree)
    apply_tensor_parallel(model, groups, device)
    pipeline = Pipeline(model, groups, schedule, device, pp_split) if dims.pp > 1 else None
    apply_expert_parallel(model, groups, time_exchange=device.type == "cpu", overlap_chunks=ep_overlap_chunks)
    install_token_split(model, groups)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        from parallel.compile import apply_compile

        apply_compile(model)  # after AC (it compiles inside the wrappers), before data parallelism
    if moe is not None:
        moe.layers = moe_layers(model)  # this rank's layers (the pipeline cut kept some)
    par = Parallelized(model=model, forward_model=model, groups=groups, pipeline=pipeline, microbatches=microbatches,
                       moe=moe)
    if degree:  # the last step: shard what the steps above left on this rank
        if par.manual_grads:
            tag_norm_copies(model, groups)  # read (pipeline ties) and rewritten by apply_fsdp
        roots = pipeline.modules if pipeline is not None else None
        apply_fsdp(model, groups, device, plan(groups, device, degree, reshard_after_forward, precision), roots)
        par.fsdp = True
    elif par.manual_grads:
        tag_norm_copies(model, groups)
    else:
        par.forward_model = apply_data_parallel(model, device)
    return par
