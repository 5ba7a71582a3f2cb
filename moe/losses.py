"""Balancing losses of the router, and how their gradient reaches the optimizer.

Uniform routing gives a load-balancing loss of exactly 1 (E * E * 1/E * 1/E).
"""
from __future__ import annotations

import torch

from moe.router import Routing


def load_balancing_loss(probs_NE: torch.Tensor, expert_A: torch.Tensor, top_k: float) -> torch.Tensor:
    """Switch loss E * sum_e f_e * P_e: f_e = share of the N*K assignments routed to e (counted
    before dropping, no gradient), P_e = mean router probability of e (carries the gradient)."""
    N, E = probs_NE.shape
    f_E = torch.bincount(expert_A, minlength=E).to(probs_NE.dtype) / (N * top_k)
    return E * (f_E * probs_NE.mean(0)).sum()


def sequence_load_balancing_loss(probs_NE: torch.Tensor, expert_A: torch.Tensor, token_A: torch.Tensor,
                                 top_k: float, seq_len: int) -> torch.Tensor:
    """The same loss computed within each sequence of `seq_len` tokens, then averaged
    (DeepSeek-V3's sequence-wise variant: balance inside every sequence, not only on average)."""
    N, E = probs_NE.shape
    B = N // seq_len
    seq_A = token_A // seq_len
    f_BE = torch.zeros(B, E, dtype=probs_NE.dtype, device=probs_NE.device)
    f_BE.index_put_((seq_A, expert_A), torch.ones_like(seq_A, dtype=probs_NE.dtype), accumulate=True)
    f_BE = f_BE / (seq_len * top_k)
    P_BE = probs_NE.view(B, seq_len, E).mean(1)
    return E * (f_BE * P_BE).sum(-1).mean()


def z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean(logsumexp(logits)^2) keeps the logits small."""
    return torch.logsumexp(logits_NE, dim=-1).square().mean()


def router_losses(routing: Routing, cfg, seq_len: int) -> dict[str, torch.Tensor]:
    """The enabled losses, unweighted; `total` is their coefficient-weighted sum."""
    out: dict[str, torch.Tensor] = {}
    total = routing.probs_NE.new_zeros(())
    k = cfg.top_k if not routing.capacity_bounded else routing.expert_A.numel() / routing.probs_NE.shape[0]
    if cfg.aux_loss_coeff > 0:
        out["lb_loss"] = load_balancing_loss(routing.probs_NE, routing.expert_A, k)
        total = total + cfg.aux_loss_coeff * out["lb_loss"]
    if cfg.seq_aux_loss_coeff > 0:
        out["seq_lb_loss"] = sequence_load_balancing_loss(routing.probs_NE, routing.expert_A, routing.token_A, k, seq_len)
        total = total + cfg.seq_aux_loss_coeff * out["seq_lb_loss"]
    if cfg.z_loss_coeff > 0:
        out["z_loss"] = z_loss(routing.logits_NE)
        total = total + cfg.z_loss_coeff * out["z_loss"]
    out["total"] = total
    return out


class _AttachAux(torch.autograd.Function):
    """Identity on `out`; in backward, also sends gradient 1 into `aux` (already scaled)."""

    @staticmethod
    def forward(ctx, out, aux):
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, torch.ones((), dtype=torch.float32, device=grad_out.device)


def attach_aux_loss(out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    """Make backward through `out` also minimise `scale * aux`.

    `scale` is the weight the main loss has in the same backward (loss scale x this
    micro-batch's share of the step), so the auxiliary loss is an average over the step like the
    task loss. Nothing travels with the activations, so this works across pipeline stages.
    """
    return _AttachAux.apply(out, aux * scale)
