"""The MoE layer: route -> dispatch -> experts -> combine (+ shared expert), a drop-in FFN."""
from __future__ import annotations

import torch
import torch.nn as nn

from moe.config import MoEConfig
from moe.dispatcher import LocalDispatcher
from moe.experts import GroupedExperts, SwiGLU
from moe.losses import attach_aux_loss, router_losses
from moe.router import build_router, capacity
from moe.stats import StepStats, recomputing


class MoELayer(nn.Module):
    """x [B, T, C] -> [B, T, C]. Capacity applies in training only; evaluation is dropless."""

    def __init__(self, d_model: int, cfg: MoEConfig, layer_id: int = 0):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        self.router = build_router(d_model, cfg)
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.expert_hidden, cfg.backend)
        self.shared = SwiGLU(d_model, cfg.shared_expert_hidden) if cfg.shared_expert_hidden else None
        # One logit per token: how much of the shared expert it takes (Qwen2-MoE).
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_expert_gate else None
        self.dispatcher = LocalDispatcher()  # parallel/ swaps in the all-to-all one
        self.aux_loss_scale = 1.0  # the micro-batch's loss weight (moe.step.MoEStep.set_loss_weight)
        self.stats = StepStats(cfg.num_experts)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.gate.weight, std=std)
        self.experts.init_weights(std, out_std)
        if self.shared is not None:
            for lin, s in ((self.shared.w1, std), (self.shared.w3, std), (self.shared.w2, out_std)):
                nn.init.normal_(lin.weight, std=s)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=std)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        x_NC = x_BTC.reshape(-1, C)
        routing = self.router(x_NC)
        self.last_counts_E = routing.counts_E.detach()  # read by families that split counts (multimodal)
        cap = capacity(B * T, self.cfg) if self.training and self.cfg.capacity_factor is not None else None
        fused = getattr(self.dispatcher, "dispatch_compute_combine", None)
        if fused is not None:  # a dispatcher that overlaps its exchanges with the experts
            out_NC, dropped = fused(x_NC, routing, cap, self.cfg.drop_policy, self.experts)
        else:
            d = self.dispatcher.dispatch(x_NC, routing, cap, self.cfg.drop_policy)
            y_MC = self.experts(d.x_MC, d.group_sizes_E, d.weight_M)  # routing weight applied inside
            out_NC, dropped = self.dispatcher.combine(y_MC, d, B * T), d.dropped
        if self.shared is not None:
            shared_NC = self.shared(x_NC)
            if self.shared_gate is not None:
                shared_NC = torch.sigmoid(self.shared_gate(x_NC)) * shared_NC
            out_NC = out_NC + shared_NC
        if self.training:
            losses = router_losses(routing, self.cfg, T)
            if torch.is_grad_enabled() and losses["total"].requires_grad:
                out_NC = attach_aux_loss(out_NC, losses["total"], self.aux_loss_scale)
            if not recomputing():  # a recomputed forward (activation checkpointing) was counted already
                self.stats.add(routing.counts_E, B * T, dropped, routing.probs_NE,
                               {**losses, "aux_total": losses["total"]})
        return out_NC.view(B, T, C)

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower the others."""
        rate = self.cfg.bias_update_rate
        if rate > 0 and counts_E.sum() > 0:
            self.router.expert_bias += rate * torch.sign(counts_E.mean() - counts_E)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]
