"""Routers: token-choice top-k and expert-choice. Both return a flat list of assignments.

The gate is computed in fp32 whatever the autocast dtype: small logit differences decide
the top-k, and bf16 would turn them into ties.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.config import MoEConfig


@dataclass
class Routing:
    """Assignments (token copies) of one layer call, before any capacity dropping."""

    token_A: torch.Tensor  # int64 [A]: which token
    expert_A: torch.Tensor  # int64 [A]: which expert
    weight_A: torch.Tensor  # fp32 [A]: combine weight (differentiable: the router learns through it)
    priority_A: torch.Tensor  # fp32 [A]: router score, the order in which copies survive capacity
    probs_NE: torch.Tensor  # fp32 [N, E]: normalised router probabilities (for the balancing loss)
    logits_NE: torch.Tensor  # fp32 [N, E]: gate logits (for the z-loss)
    counts_E: torch.Tensor  # int64 [E]: assignments per expert before dropping
    capacity_bounded: bool  # True if the router already respects capacity (expert choice)


def capacity(num_tokens: int, cfg: MoEConfig) -> int:
    """C = max(min_capacity, ceil(capacity_factor * N * K / E)); never more than N * K."""
    c = math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts)
    return min(max(c, cfg.min_capacity), num_tokens * cfg.top_k)


def gate_logits(gate: nn.Linear, x_NC: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 at least (float64 stays float64, for gradcheck)."""
    dtype = torch.promote_types(x_NC.dtype, torch.float32)
    with torch.autocast(device_type=x_NC.device.type, enabled=False):
        return F.linear(x_NC.to(dtype), gate.weight.to(dtype))


def scores(logits_NE: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores that weight the experts' outputs, probabilities that sum to 1 per token) from the
    gate logits: softmax gives both at once; sigmoid scores are normalised for the balancing loss."""
    if cfg.score_func == "softmax":
        scores_NE = logits_NE.softmax(-1)
        return scores_NE, scores_NE
    scores_NE = logits_NE.sigmoid()
    return scores_NE, scores_NE / scores_NE.sum(-1, keepdim=True).clamp_min(1e-20)


def select_topk(scores_NE: torch.Tensor, expert_bias_E: torch.Tensor | None,
                cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-choice selection: (expert ids [N, K], combine weights [N, K]) of every token.

    The balancing bias (and the group limit) only choose the experts; the weights are the raw
    scores of the chosen ones, renormalised if configured. Training, evaluation and the
    inference form (moe/export.py) all select through this one function.
    """
    select_NE = scores_NE.detach()
    if expert_bias_E is not None:
        select_NE = select_NE + expert_bias_E
    if cfg.num_groups is not None:
        select_NE = group_limit(select_NE, cfg.num_groups, cfg.group_topk)
    topk_NK = select_NE.topk(cfg.top_k, dim=-1).indices
    weight_NK = scores_NE.gather(1, topk_NK)
    # NOTE: top-1 softmax keeps its raw probability (Switch): renormalised it would always be 1
    # and the router would get no gradient from the task loss.
    if cfg.renormalize and (cfg.top_k > 1 or cfg.score_func == "sigmoid"):
        weight_NK = weight_NK / weight_NK.sum(-1, keepdim=True).clamp_min(1e-20)
    if cfg.routed_scaling_factor != 1.0:
        weight_NK = weight_NK * cfg.routed_scaling_factor
    return topk_NK, weight_NK


class TopKRouter(nn.Module):
    """Each token picks its top-k experts by score (+ the balancing bias, for selection only)."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(d_model, cfg.num_experts, bias=False)
        # Auxiliary-loss-free balancing (or an imported correction bias): a buffer, so it is
        # checkpointed but never trained. Zero unless balancing moved it or a checkpoint held one,
        # so adding it always leaves the selection of a model without one exactly as it was.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts),
                             persistent=cfg.bias_update_rate > 0 or cfg.selection_bias)

    def forward(self, x_NC: torch.Tensor) -> Routing:
        cfg, N = self.cfg, x_NC.shape[0]
        if self.training and cfg.jitter > 0:
            x_NC = x_NC * torch.empty_like(x_NC).uniform_(1 - cfg.jitter, 1 + cfg.jitter)
        logits_NE = gate_logits(self.gate, x_NC)
        scores_NE, probs_NE = scores(logits_NE, cfg)
        topk_NK, weight_NK = select_topk(scores_NE, self.expert_bias, cfg)
        expert_A = topk_NK.reshape(-1)
        return Routing(
            token_A=torch.arange(N, device=x_NC.device).repeat_interleave(cfg.top_k),
            expert_A=expert_A,
            weight_A=weight_NK.reshape(-1),
            priority_A=scores_NE.detach().gather(1, topk_NK).reshape(-1),
            probs_NE=probs_NE, logits_NE=logits_NE,
            counts_E=torch.bincount(expert_A, minlength=cfg.num_experts),
            capacity_bounded=False)


def group_limit(select_NE: torch.Tensor, num_groups: int, group_topk: int) -> torch.Tensor:
    """Keep only the experts of each token's `group_topk` best groups (a group scores the sum of
    its two best experts, as DeepSeek-V3 does); the others get -inf."""
    N, E = select_NE.shape
    per_group = select_NE.view(N, num_groups, E // num_groups)
    group_score_NG = per_group.topk(min(2, E // num_groups), dim=-1).values.sum(-1)
    keep_NG = torch.zeros_like(group_score_NG, dtype=torch.bool)
    keep_NG.scatter_(1, group_score_NG.topk(group_topk, dim=-1).indices, True)
    return per_group.masked_fill(~keep_NG[..., None], float("-inf")).view(N, E)


class ExpertChoiceRouter(nn.Module):
    """Each expert picks its top-C tokens of the micro-batch (Zhou et al. 2022): balanced by
    construction, but a token's routing depends on the other tokens, future ones included.

    So only training routes by expert choice. In evaluation (`self.training` False) each token
    takes its own top-k experts (k = `top_k`, the same mean copies per token as C = cf * N * k / E
    gives) over the same softmax scores, weighted by the raw probability as in training: the
    validation loss and perplexity of such a model are causal, measured on a token-choice
    reading of its router, and never see a later token.
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(d_model, cfg.num_experts, bias=False)

    def forward(self, x_NC: torch.Tensor) -> Routing:
        cfg, N = self.cfg, x_NC.shape[0]
        logits_NE = gate_logits(self.gate, x_NC)
        probs_NE = logits_NE.softmax(-1)
        if not self.training:
            return self._token_choice(logits_NE, probs_NE)
        C = min(capacity(N, cfg), N)
        top = probs_NE.t().topk(C, dim=-1)  # [E, C]
        expert_A = torch.arange(cfg.num_experts, device=x_NC.device).repeat_interleave(C)
        return Routing(token_A=top.indices.reshape(-1), expert_A=expert_A, weight_A=top.values.reshape(-1),
                       priority_A=top.values.detach().reshape(-1), probs_NE=probs_NE, logits_NE=logits_NE,
                       counts_E=torch.full((cfg.num_experts,), C, device=x_NC.device, dtype=torch.long),
                       capacity_bounded=True)

    def _token_choice(self, logits_NE: torch.Tensor, probs_NE: torch.Tensor) -> Routing:
        """Causal evaluation: token n's experts and weights depend on token n alone."""
        cfg, N = self.cfg, probs_NE.shape[0]
        top = probs_NE.topk(cfg.top_k, dim=-1)  # [N, K]
        expert_A = top.indices.reshape(-1)
        return Routing(token_A=torch.arange(N, device=probs_NE.device).repeat_interleave(cfg.top_k),
                       expert_A=expert_A, weight_A=top.values.reshape(-1), priority_A=top.values.detach().reshape(-1),
                       probs_NE=probs_NE, logits_NE=logits_NE,
                       counts_E=torch.bincount(expert_A, minlength=cfg.num_experts), capacity_bounded=False)


ROUTERS = {"topk": TopKRouter, "expert_choice": ExpertChoiceRouter}


def build_router(d_model: int, cfg: MoEConfig) -> nn.Module:
    return ROUTERS[cfg.router](d_model, cfg)
