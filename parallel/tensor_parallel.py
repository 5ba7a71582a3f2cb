"""Tensor parallelism, applied from outside with `torch.distributed.tensor` plans (Megatron-style).

Per block (found by module name, not class): attention wq/wk/wv column-parallel (each TP rank
computes n_heads/tp whole heads; the model's `view(B, T, -1, head_dim)` infers the local head
count) and wo row-parallel (one all-reduce); a dense SwiGLU's w1/w3 column-parallel and w2
row-parallel (one all-reduce). Between blocks activations are plain replicated tensors.

NOTE: the embedding, final norm and output head stay replicated on purpose. The vocabularies here
are small (257 bytes, a few thousand BPE tokens), the head is tied to the embedding by default
(`x @ embed.weight.t()` inside the model, which a vocabulary-sharded DTensor weight cannot join
without changing the model), and a vocabulary-parallel head would also need a sharded
cross-entropy (`loss_parallel`) inside the task's loss. Each TP rank computes the full head: cheap
next to the blocks at these vocabulary sizes, and the loss code stays the single-process code.

MoE layers: experts stay whole (replicated over TP). The router runs on every TP rank on all the
tokens (it is tiny, and capacity/dropping decisions then equal the single process); then each TP
rank keeps only the kept token copies of its contiguous 1/tp slice of the tokens, runs them
through its experts (or through the all-to-all to its EP peers, which share its TP index), and
the partial outputs are summed over TP. So no expert computes a token twice across the TP group.
A shared expert inside an MoE layer gets the dense column/row plan.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from moe.dispatcher import Dispatched, keep_order
from moe.router import Routing
from moe.layer import moe_layers
from parallel.mesh import ProcessGroups


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the TP group (each rank contributed
    the gradient of its own tokens only)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Sum over the TP group forward; identity backward (the consumers are replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class TensorParallelTokens:
    """Dispatcher wrapper: same routing and capacity decisions on every TP rank, then each TP rank
    dispatches only the kept copies of its own token slice through `inner` (local or all-to-all)."""

    def __init__(self, inner, group: dist.ProcessGroup, tp: int, tp_rank: int):
        self.inner, self.group, self.tp, self.tp_rank = inner, group, tp, tp_rank

    def exchange_seconds(self) -> float:
        return self.inner.exchange_seconds()

    def dispatch(self, x_NC: torch.Tensor, routing: Routing, capacity: int | None, drop_policy: str) -> Dispatched:
        N = x_NC.shape[0]
        order, sizes_E = keep_order(routing, capacity, drop_policy)  # identical on every TP rank
        lo, hi = N * self.tp_rank // self.tp, N * (self.tp_rank + 1) // self.tp
        token = routing.token_A[order]
        mine = order[(token >= lo) & (token < hi)]
        weight_A = _CopyToTP.apply(routing.weight_A, self.group)
        expert = routing.expert_A[mine]
        sub = Routing(token_A=routing.token_A[mine], expert_A=expert, weight_A=weight_A[mine],
                      priority_A=routing.priority_A[mine], probs_NE=routing.probs_NE, logits_NE=routing.logits_NE,
                      counts_E=torch.bincount(expert, minlength=sizes_E.numel()), capacity_bounded=True)
        d = self.inner.dispatch(_CopyToTP.apply(x_NC, self.group), sub, None, drop_policy)
        d.dropped = routing.expert_A.numel() - sizes_E.sum()
        return d

    def combine(self, y_MC: torch.Tensor, d: Dispatched, num_tokens: int) -> torch.Tensor:
        return _ReduceFromTP.apply(self.inner.combine(y_MC, d, num_tokens), self.group)


def tp_mesh(groups: ProcessGroups, device: torch.device) -> DeviceMesh:
    if groups.device_mesh is not None:  # FSDP x TP: one root mesh for both (parallel.fsdp)
        return groups.device_mesh["tp"]
    return DeviceMesh.from_group(groups.tp, device.type, mesh_dim_names=("tp",))


def apply_tensor_parallel(model: nn.Module, groups: ProcessGroups, device: torch.device) -> nn.Module:
    """Shard every block's attention and MLP over the TP group (see the module docstring).

    Call before `apply_expert_parallel`: the token-slicing dispatcher installed here wraps
    whichever dispatcher a MoE layer holds when it runs, and expert parallelism swaps the inner one.
    """
    dims = groups.dims
    if dims.tp == 1:
        return model
    mesh = tp_mesh(groups, device)
    for block in model.layers.values():
        if getattr(block.attn, "qk_norm", "none") == "full":
            raise ValueError("parallel.tp: model.qk_norm 'full' normalises whole q/k projections, which tensor "
                             "parallelism splits by head; use tp: 1 (pipeline or expert parallelism work)")
        # An attention module may name its own head-sharded linears (MLA: wq | wq_b, wkv_b, wo; its
        # latent projections stay replicated); else the wq/wk/wv/wo of `Attention`.
        styles = getattr(block.attn, "tp_plan", None) or {"wq": "colwise", "wk": "colwise", "wv": "colwise",
                                                         "wo": "rowwise"}
        plan = {f"attn.{name}": ColwiseParallel() if style == "colwise" else RowwiseParallel()
                for name, style in styles.items()}
        mlp = block.mlp
        dense = mlp if hasattr(mlp, "w1") else getattr(mlp, "shared", None)
        if dense is not None:
            prefix = "mlp" if dense is mlp else "mlp.shared"
            plan.update({f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w3": ColwiseParallel(),
                         f"{prefix}.w2": RowwiseParallel()})
        parallelize_module(block, mesh, plan)
        if hasattr(block.attn, "shared_key_hook"):  # MLA's RoPE key, shared by the heads of every TP rank
            block.attn.shared_key_hook = lambda t, group=groups.tp: _CopyToTP.apply(t, group)
    return model


def install_token_split(model: nn.Module, groups: ProcessGroups) -> None:
    """Wrap every MoE layer's (final) dispatcher so TP ranks split the tokens (after EP is applied)."""
    dims = groups.dims
    if dims.tp == 1:
        return
    for layer in moe_layers(model):
        layer.dispatcher = TensorParallelTokens(layer.dispatcher, groups.tp, dims.tp, dims.coords(groups.rank)[2])


def is_sharded(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an alias: in-place changes reach the DTensor), else `t`."""
    return t._local_tensor if isinstance(t, DTensor) else t
