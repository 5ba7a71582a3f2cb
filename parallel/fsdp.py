"""Sharded data parallelism (torch FSDP2, `fully_shard`), applied last by `parallel.apply`.

What is sharded over which ranks (torchtitan's "efsdp" idea, in this repository's mesh):
  dense parameters   over the data-parallel ranks of the stage (mesh dim "dp_shard"; with a
                     degree d < dp, HSDP: sharded over d ranks, replicated over dp / d)
  expert parameters  over their expert group: the edp x tp ranks that hold the same experts
                     (`ProcessGroups.edp`). Their gradients are summed over that group and divided
                     by dp (what `parallel.expert_parallel.reduce_expert_grads` does without FSDP):
                     under EP the backward exchange already brought every EP peer's contribution,
                     and under TP each TP rank ran different tokens through them.
  an expert group of one rank (ep = dp, tp = 1): the experts stay plain tensors, out of FSDP
                     (`ignored_params`), reduced by `reduce_expert_grads` as without FSDP.
Wrapping is per block: experts first (their own unit, on their own mesh), then each block of
`model.layers`, then the root (embedding, final norm, head): the whole model when there is no
pipeline, else each pipeline stage module (torch.distributed.pipelining then drives FSDP's
gradient-sync switches across micro-batches itself).

Tensor parallelism composes as 2-D DTensors: `build_device_mesh` makes one root mesh
(pp, dp_replicate, dp_shard, tp) before tensor parallelism runs, TP takes its "tp" slice and FSDP
the data-parallel slice, so FSDP sees TP's DTensors on a mesh with the same root.

FSDP replaces every parameter by a new `nn.Parameter` (a DTensor), so the tags other steps set
(`norm_copies`, `pipeline_tied`) are read before and set again after (`_retag`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from moe.layer import moe_layers
from parallel.mesh import ProcessGroups


def fsdp_degree(fsdp: bool | int, dp: int) -> int:
    """The number of data-parallel ranks one dense shard group spans (0: FSDP off, also with one
    data-parallel rank, where there is nothing to shard over: the model stays plain)."""
    if fsdp is not True and int(fsdp) <= 1 or dp == 1 or not (dist.is_available() and dist.is_initialized()):
        return 0
    return dp if fsdp is True else int(fsdp)


def check_degree(fsdp: bool | int, dp: int) -> None:
    """Raise ValueError naming the valid degrees when `fsdp` does not divide the data-parallel size."""
    if isinstance(fsdp, bool):
        return
    d = int(fsdp)
    valid = [k for k in range(2, dp + 1) if dp % k == 0]
    if d < 0 or d == 1 or (d > 1 and dp % d):
        shown = ", ".join(map(str, valid)) if valid else "none (only 1 data-parallel rank)"
        raise ValueError(f"parallel.fsdp: a degree of {d} does not divide the data-parallel size {dp} into shard "
                         f"groups; valid: true, false, or a degree {shown}")


# Families whose blocks sit in `model.layers` and that the FSDP tests cover.
FSDP_ARCHS = ("transformer", "moe_transformer")


def refused(fsdp: bool | int, dims, model_cfg, schedule: str = "1f1b") -> str | None:
    """Why this layout cannot run with FSDP (None if it can); each reason is listed in README."""
    degree = dims.dp if fsdp is True else int(fsdp)
    if not degree:
        return None
    arch = getattr(model_cfg, "arch", None)
    if arch not in FSDP_ARCHS:
        return (f"parallel.fsdp: supports model.arch {' and '.join(FSDP_ARCHS)} (one FSDP unit per block of "
                f"`layers`, tested against the single process), not {arch!r}; use parallel.fsdp=false")
    if dims.pp > 1 and schedule == "interleaved_1f1b":
        return ("parallel.fsdp: not with parallel.schedule=interleaved_1f1b (two pipeline stages of one worker "
                "share its blocks; untested with FSDP); use 1f1b or gpipe, or parallel.fsdp=false")
    if 1 < degree < dims.dp and (dims.tp > 1 or dims.pp > 1 or dims.ep > 1):
        return (f"parallel.fsdp: the HSDP degree {degree} (< dp={dims.dp}) is supported for data parallelism "
                "alone; with tp, pp or ep > 1 use parallel.fsdp=true")
    return None


def build_device_mesh(groups: ProcessGroups, device: torch.device, degree: int) -> DeviceMesh:
    """The root mesh (pp, dp_replicate, dp_shard, tp) of the whole world, in the rank order of
    `parallel.mesh` (rank = (pp_rank * dp + dp_rank) * tp + tp_rank, dp_rank = replicate * degree + shard).
    Every rank must call this, in the same order (it creates process groups)."""
    dims = groups.dims
    shape = (dims.pp, dims.dp // degree, degree, dims.tp)
    return init_device_mesh(device.type, shape, mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"))


@dataclass
class FSDPPlan:
    dense_mesh: DeviceMesh  # 1-D ("dp_shard") or 2-D HSDP ("dp_replicate", "dp_shard")
    expert_mesh: DeviceMesh | None  # the expert group; None: experts join the dense units, or stay plain
    experts_apart: bool  # experts are not sharded with the dense weights (EP or TP)
    reshard_after_forward: bool
    mp_policy: MixedPrecisionPolicy


def mixed_precision(precision: str, device: torch.device) -> MixedPrecisionPolicy:
    """On GPU: parameters all-gathered and computed in bf16/fp16, gradients reduced in fp32, fp32
    sharded master weights for the optimizer. On CPU: fp32 throughout (bf16 GEMMs are slow there)."""
    if device.type != "cuda" or precision == "fp32":
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def plan(groups: ProcessGroups, device: torch.device, degree: int, reshard_after_forward: bool,
         precision: str) -> FSDPPlan:
    dims = groups.dims
    root = groups.device_mesh
    dense = root["dp_shard"] if degree == dims.dp else root["dp_replicate", "dp_shard"]
    experts_apart = dims.ep > 1 or dims.tp > 1
    expert_mesh = None
    if experts_apart and dims.edp * dims.tp > 1:
        expert_mesh = DeviceMesh.from_group(groups.edp, device.type, mesh_dim_names=("edp",))
    return FSDPPlan(dense, expert_mesh, experts_apart, reshard_after_forward, mixed_precision(precision, device))


def _expert_placement(mesh_size: int):
    """Shard experts by expert (dim 0) when every rank gets whole experts, else inside each expert
    (dim 1: d_model of w13, hidden of w2), which FSDP needs to divide evenly."""
    def place(p: nn.Parameter) -> Shard:
        if p.shape[0] % mesh_size == 0 or p.shape[1] % mesh_size:
            return Shard(0)
        return Shard(1)
    return place


def apply_fsdp(model: nn.Module, groups: ProcessGroups, device: torch.device, p: FSDPPlan,
               roots: list[nn.Module] | None = None) -> None:
    """Shard `model` in place: experts, blocks, then `roots` (default: the model itself)."""
    dims = groups.dims
    tags = {name: (getattr(t, "norm_copies", None), getattr(t, "pipeline_tied", False))
            for name, t in model.named_parameters()}
    expert_params: set[nn.Parameter] = set()
    ignored: set[nn.Parameter] = set()
    for layer in moe_layers(model):
        if not p.experts_apart:
            continue
        if p.expert_mesh is None:  # one rank holds these experts: nothing to shard them over
            ignored |= {layer.experts.w13, layer.experts.w2}
            continue
        size = p.expert_mesh.size()
        unit = fully_shard(layer.experts, mesh=p.expert_mesh, reshard_after_forward=p.reshard_after_forward,
                           shard_placement_fn=_expert_placement(size), mp_policy=p.mp_policy)
        # Sum over the expert group, then / dp (see module docstring). NOTE: with a divide factor
        # other than the group size FSDP asks for a PREMUL_SUM reduce-scatter, which only NCCL
        # has; gloo needs the plain-sum form (sum, then divide the shard).
        unit.set_gradient_divide_factor(float(dims.dp))
        if device.type != "cuda":
            unit.set_force_sum_reduction_for_comms(True)
        expert_params |= {layer.experts.w13, layer.experts.w2}
    for block in model.layers.values():
        fully_shard(block, mesh=p.dense_mesh, reshard_after_forward=p.reshard_after_forward,
                    mp_policy=p.mp_policy, ignored_params=ignored or None)
    for root in roots if roots is not None else [model]:
        # The root's parameters (embedding, norm, head) are needed again right at the start of
        # backward: keep them gathered (FSDP's default for a root).
        fully_shard(root, mesh=p.dense_mesh, reshard_after_forward=False, mp_policy=p.mp_policy,
                    ignored_params=ignored or None)
    _retag(model, groups, tags, ignored, replicas=dims.dp // p.dense_mesh["dp_shard"].size())


def _retag(model: nn.Module, groups: ProcessGroups, tags: dict, ignored: set, replicas: int) -> None:
    """`norm_copies` of every parameter after sharding: how many ranks hold the very same local
    shard (parallel.grads.clip_grad_norm). Dense shards are held once per TP rank unless TP
    shards them too, twice when they are one of the two copies of a pipeline-tied embedding, and
    once per HSDP replica; expert shards (and plain experts of a one-rank expert group) once."""
    dims = groups.dims
    from moe.experts import GroupedExperts

    expert_names = {f"{n}.{w}" for n, m in model.named_modules() if isinstance(m, GroupedExperts) for w in ("w13", "w2")}
    for name, t in model.named_parameters():
        old_copies, tied = tags.get(name, (None, False))
        if t in ignored:
            t.norm_copies = old_copies if old_copies is not None else 1
            continue
        if name in expert_names and (dims.ep > 1 or dims.tp > 1):
            copies = 1
        else:
            tp_sharded = isinstance(t, DTensor) and "tp" in (t.device_mesh.mesh_dim_names or ())
            copies = (1 if tp_sharded or dims.tp == 1 else dims.tp) * (2 if tied else 1) * replicas
        t.norm_copies = copies
        if tied:
            t.pipeline_tied = True


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(model: nn.Module):
    """Accumulate gradients unsharded and unreduced (micro-batches before the last)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def sharded_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state, counted from the tensors
    (a DTensor counts its local shard only)."""
    def nbytes(t: torch.Tensor) -> int:
        t = t._local_tensor if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    out = {"params": sum(nbytes(t) for t in params),
           "grads": sum(nbytes(t.grad) for t in params if t.grad is not None), "optimizer": 0}
    if optimizer is not None:
        out["optimizer"] = sum(nbytes(v) for st in optimizer.state.values() for v in st.values()
                               if torch.is_tensor(v))
    return out
