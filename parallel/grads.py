"""Gradient reductions that DDP does not do, and the global gradient norm of any layout.

Every parameter may carry `norm_copies`: how many ranks of the world hold the very same tensor
(replicas over data parallelism, over TP for weights TP leaves whole, the two copies of a tied
embedding under PP). Untagged parameters are replicated on every rank (data parallelism only).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.mesh import ProcessGroups
from parallel.tensor_parallel import is_sharded, local


def tag_norm_copies(model: nn.Module, groups: ProcessGroups) -> None:
    """Set `norm_copies` of the non-expert parameters (experts are tagged by expert parallelism)."""
    dims = groups.dims
    for name, p in model.named_parameters():
        if hasattr(p, "norm_copies"):
            continue
        copies = dims.dp * (1 if is_sharded(p) else dims.tp)
        if getattr(p, "pipeline_tied", False):
            copies *= 2  # the tied embedding on the first and the last stage
        p.norm_copies = copies


def average_replicated_grads(model: nn.Module, groups: ProcessGroups) -> None:
    """Without DDP (TP or PP layouts): sum the tied embedding's two copies, then average every
    non-expert gradient over the data-parallel group in one flat all-reduce."""
    from parallel.pipeline import sync_tied_embedding

    sync_tied_embedding(model, groups)
    dp = groups.dims.dp
    if dp == 1:
        return
    grads = [local(p.grad) for p in model.parameters()
             if p.grad is not None and not getattr(p, "expert_parallel", False)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=groups.dp)
    flat.div_(dp)
    for g, new in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(new)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global gradient norm over the whole model (then clipped to `max_norm` unless None).

    Each rank adds |g|^2 / norm_copies of what it holds and one all-reduce over the world sums
    them: expert shards (EP), TP shards and pipeline stages count once each, replicas once in
    total. Every rank gets the same norm and the same clipping coefficient (a local norm would
    scale the replicated weights differently on each rank and let them drift apart).
    NOTE: every rank takes part in the all-reduce, even one without gradients.
    """
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    default = dist.get_world_size() if distributed else 1
    with_grad = [p for p in params if p.grad is not None]
    device = with_grad[0].grad.device if with_grad else torch.device("cpu")
    by_copies: dict[int, list[torch.Tensor]] = {}
    for p in with_grad:
        by_copies.setdefault(getattr(p, "norm_copies", default), []).append(local(p.grad))
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for copies, grads in by_copies.items():
        sq = sq + torch.stack(torch._foreach_norm(grads)).float().square().sum() / copies
    if distributed:
        dist.all_reduce(sq)
    norm = sq.sqrt()
    if max_norm is not None and with_grad:
        grads = [g for gs in by_copies.values() for g in gs]
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm
