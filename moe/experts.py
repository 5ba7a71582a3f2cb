"""Routed experts: E SwiGLU MLPs whose matmuls run as grouped GEMMs over expert-sorted rows."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import Choice, choose_backend, grouped_mm


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): the gated MLP of Llama-style transformers (a dense FFN, and the
    shared expert of an MoE layer)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BTC)) * self.w3(x_BTC))


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up [* weight] for h = [gate | up] of shape [M, 2F], optional weights [M].

    One function instead of chunk -> silu -> mul (-> mul): backward writes both halves of dh
    straight into one buffer (no concatenation), in five passes over [M, F] with weights.
    """

    @staticmethod
    def forward(ctx, h_M2F: torch.Tensor, weight_M: torch.Tensor | None) -> torch.Tensor:
        gate, up = h_M2F.chunk(2, dim=-1)
        silu = F.silu(gate)
        su = silu * up
        ctx.save_for_backward(h_M2F, silu, su if weight_M is not None else None, weight_M)
        return su if weight_M is None else su * weight_M[:, None].to(su.dtype)

    @staticmethod
    def backward(ctx, grad_MF: torch.Tensor):
        h_M2F, silu, su, weight_M = ctx.saved_tensors
        gate, up = h_M2F.chunk(2, dim=-1)
        dh = torch.empty_like(h_M2F)
        d_gate, d_up = dh.chunk(2, dim=-1)
        grad_w = None
        g = grad_MF
        if weight_M is not None:
            if ctx.needs_input_grad[1]:
                grad_w = torch.linalg.vecdot(grad_MF, su).to(weight_M.dtype)
            g = grad_MF * weight_M[:, None].to(grad_MF.dtype)
        torch.mul(g, silu, out=d_up)
        torch.ops.aten.silu_backward.grad_input(g * up, gate, grad_input=d_gate)
        return dh, grad_w


def swiglu(h_M2F: torch.Tensor, weight_M: torch.Tensor | None = None) -> torch.Tensor:
    return _SwiGLU.apply(h_M2F, weight_M)


def swiglu_ops(h_M2F: torch.Tensor, weight_M: torch.Tensor | None = None) -> torch.Tensor:
    """`swiglu` as plain ops, for torch.compile to fuse (forward in one pass over h, backward in one
    more) where eager runs five to eight passes over [M, F]."""
    gate, up = h_M2F.chunk(2, dim=-1)
    su = F.silu(gate) * up
    return su if weight_M is None else su * weight_M[:, None].to(su.dtype)


def compute_dtype(x: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's dtype inside an autocast region on x's
    device (`torch._grouped_mm` and grouped_gemm are not autocast ops, so nothing would cast
    their operands), else the parameters' dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return param_dtype


class GroupedExperts(nn.Module):
    """w13 [E, C, 2F] (gate and up projections fused into one GEMM), w2 [E, F, C].

    Under autocast the rows and both weights are cast to the autocast dtype here, so every
    backend's kernel sees one dtype; the parameters (master weights) stay in their own dtype
    (fp32) and receive their gradients in it (the cast's backward casts back).
    Under expert parallelism a rank holds a contiguous slice of the experts; `num_experts` is
    then the local count.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden, self.backend = num_experts, hidden, backend
        self.w13 = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.activation = swiglu  # `compile_activation` swaps in a compiled one

    def compile_activation(self, backend: str = "inductor") -> None:
        """Compile the SwiGLU between the two grouped GEMMs (`train.compile`): one fused kernel
        forward and one backward, for any row count (dynamic shapes: the rows per step depend on
        the routing). The GEMMs and the permutation stay eager."""
        self.activation = torch.compile(swiglu_ops, backend=backend, dynamic=True)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def forward(self, x_MC: torch.Tensor, group_sizes_E: torch.Tensor, weight_M: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert [M, C] -> weight * expert(row) [M, C].

        The routing weight multiplies whichever is narrower: the hidden [M, F] (fine-grained
        experts, F < C) or the output [M, C]; the product is the same.
        """
        dtype = compute_dtype(x_MC, self.w13.dtype)
        backend = self.choice(x_MC.device, dtype).backend  # one backend for both GEMMs (cached)
        w13, w2 = self.w13.to(dtype), self.w2.to(dtype)  # no-ops outside autocast
        h_M2F = grouped_mm(x_MC.to(dtype), w13, group_sizes_E, backend)
        if self.hidden <= x_MC.shape[1]:
            return grouped_mm(self.activation(h_M2F, weight_M), w2, group_sizes_E, backend)
        y_MC = grouped_mm(self.activation(h_M2F, None), w2, group_sizes_E, backend)
        return y_MC * weight_M[:, None].to(y_MC.dtype)

    def choice(self, device, dtype: torch.dtype) -> Choice:
        """The kernel backend these experts run with on (device, dtype), and why the others not."""
        return choose_backend(self.backend, device, dtype, (self.w13.shape[1], 2 * self.hidden, self.hidden))
