"""Inference form of the MoE layer: per-expert linears, dropless top-k routing, two computations.

Training keeps `MoELayer` (router -> dispatcher -> grouped GEMM -> combine). Its dispatch sorts
token copies by expert and sizes groups from data (argsort, bincount, host-side splits), which an
exporter cannot trace into a static graph, and its experts are 3-D parameters that weight-only
quantizers (torchao works on `nn.Linear`) do not see. `to_inference(model)` swaps every MoE layer
for an `InferenceMoE` holding the same weights, with each expert as two `nn.Linear`s, so a
quantizer gives every expert its own scales, and with one of two forward computations that equal
the training layer's evaluation (dropless) output:

- `sparse` (eager, the default): per expert, the rows routed to it (`nonzero`, a data-dependent
  shape), its MLP, a weighted `index_add` back. Cost: top_k experts per token, as in training.
- `dense` (export): every expert on every token, combined with an [N, E] weight matrix that is
  zero outside each token's top-k (TopK, GatherElements and ScatterElements in ONNX). Static
  shapes, so it traces; cost: E / top_k times the routed experts' FLOPs (4x for 8 experts, top-2).

Expert-choice routing looks at the whole batch (training only) and is refused.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.config import MoEConfig
from moe.experts import SwiGLU
from moe.router import gate_logits, scores, select_topk


class ExpertMLP(nn.Module):
    """One SwiGLU expert: w2(silu(gate) * up) with [gate | up] = w13(x)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x_MC: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x_MC).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def route_topk(gate: nn.Linear, expert_bias: torch.Tensor | None, cfg: MoEConfig,
               x_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of `TopKRouter` in evaluation: (expert ids [N, K], combine weights [N, K] fp32),
    through the router's own code (moe/router.py), so the two cannot drift apart."""
    scores_NE, _ = scores(gate_logits(gate, x_NC), cfg)
    return select_topk(scores_NE, expert_bias, cfg)  # the bias is zero unless balancing or a checkpoint set it


class InferenceMoE(nn.Module):
    """x [B, T, C] -> [B, T, C]: the evaluation output of the `MoELayer` it was built from."""

    def __init__(self, d_model: int, cfg: MoEConfig, layer_id: int = 0, dense: bool = False):
        super().__init__()
        if cfg.router != "topk":
            raise ValueError(f"model.moe.router: {cfg.router!r} routing looks at the whole batch (training only); "
                             "only router: topk models can be exported or quantized for inference")
        self.cfg, self.layer_id, self.dense = cfg, layer_id, dense
        self.gate = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self.experts = nn.ModuleList(ExpertMLP(d_model, cfg.expert_hidden) for _ in range(cfg.num_experts))
        self.shared = None
        if cfg.shared_expert_hidden:

            self.shared = SwiGLU(d_model, cfg.shared_expert_hidden)
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_expert_gate else None

    @classmethod
    def from_layer(cls, layer: nn.Module, dense: bool = False) -> "InferenceMoE":
        """Copy a (whole, unsharded) `MoELayer`'s weights: expert e's w13 [C, 2F] becomes a Linear [2F, C]."""
        w13, w2 = layer.experts.w13.detach(), layer.experts.w2.detach()
        if w13.shape[0] != layer.cfg.num_experts:
            raise ValueError(f"MoE layer {layer.layer_id} holds {w13.shape[0]} of {layer.cfg.num_experts} experts "
                             "(expert-parallel shard); load the whole model on one process first")
        new = cls(w13.shape[1], layer.cfg, layer.layer_id, dense).to(device=w13.device, dtype=w13.dtype)
        with torch.no_grad():
            new.gate.weight.copy_(layer.router.gate.weight)
            if hasattr(layer.router, "expert_bias"):
                new.expert_bias.copy_(layer.router.expert_bias)
            for e, expert in enumerate(new.experts):
                expert.w13.weight.copy_(w13[e].t())
                expert.w2.weight.copy_(w2[e].t())
        if layer.shared is not None:
            new.shared.load_state_dict(layer.shared.state_dict())
        if layer.shared_gate is not None:
            new.shared_gate.load_state_dict(layer.shared_gate.state_dict())
        return new

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        x_NC = x_BTC.reshape(-1, C)
        topk_NK, weight_NK = route_topk(self.gate, self.expert_bias, self.cfg, x_NC)
        out_NC = self._dense(x_NC, topk_NK, weight_NK) if self.dense else self._sparse(x_NC, topk_NK, weight_NK)
        if self.shared is not None:
            shared_NC = self.shared(x_NC)
            if self.shared_gate is not None:  # as MoELayer: sigmoid-gated shared expert (Qwen2-MoE)
                shared_NC = torch.sigmoid(self.shared_gate(x_NC)) * shared_NC
            out_NC = out_NC + shared_NC
        return out_NC.view(B, T, C)

    def _sparse(self, x_NC, topk_NK, weight_NK) -> torch.Tensor:
        out_NC = torch.zeros_like(x_NC)
        for e, expert in enumerate(self.experts):
            token_M, slot_M = (topk_NK == e).nonzero(as_tuple=True)
            if token_M.numel():
                y_MC = expert(x_NC.index_select(0, token_M)) * weight_NK[token_M, slot_M, None].to(x_NC.dtype)
                out_NC.index_add_(0, token_M, y_MC)
        return out_NC

    def _dense(self, x_NC, topk_NK, weight_NK) -> torch.Tensor:
        weight_NE = torch.zeros(x_NC.shape[0], self.cfg.num_experts, dtype=weight_NK.dtype,
                                device=x_NC.device).scatter(1, topk_NK, weight_NK)
        y_NEC = torch.stack([expert(x_NC) for expert in self.experts], dim=1)
        return (weight_NE.to(x_NC.dtype)[:, :, None] * y_NEC).sum(1)


def to_inference(model: nn.Module, dense: bool = False) -> nn.Module:
    """Replace every `MoELayer` of `model` (in place) by an `InferenceMoE` with its weights; returns `model`."""
    from moe.layer import MoELayer

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    for name, layer in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, InferenceMoE.from_layer(layer, dense).train(layer.training))
    return model


def set_dense(model: nn.Module, dense: bool) -> None:
    """Switch every `InferenceMoE` of `model` between the sparse (eager) and dense (export) computation."""
    for m in model.modules():
        if isinstance(m, InferenceMoE):
            m.dense = dense
