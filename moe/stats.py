"""Per-layer MoE statistics: accumulated on the device during a step, reduced once per step.

Every rank reduces one fixed-size tensor ([layers, E + SCALARS]) whatever its layers saw, so a
rank (or pipeline stage) cannot hang the others. The reduction also drives the bias update of
auxiliary-loss-free balancing, so every rank applies the same update.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

SCALARS = ("forwards", "tokens", "assignments", "dropped", "entropy_sum", "lb_loss", "seq_lb_loss", "z_loss", "aux_total")


def recomputing() -> bool:
    """True while the autograd engine runs a backward pass. A layer's forward called then is
    activation checkpointing recomputing its block (torch.utils.checkpoint re-runs the forward
    inside backward, reentrant or not); its statistics were already counted by the first forward.
    NOTE: torch has no public flag for this; the graph-task id is -1 outside backward."""
    return torch._C._current_graph_task_id() != -1


class StepStats:
    """Running sums of one layer for the current step: counts per expert, then SCALARS."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.buf: torch.Tensor | None = None

    def add(self, counts_E: torch.Tensor, tokens: int, dropped: torch.Tensor, probs_NE: torch.Tensor,
            losses: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            entropy_sum = -(probs_NE * probs_NE.clamp_min(1e-20).log()).sum()
            zero = entropy_sum.new_zeros(())
            scalars = torch.stack([
                torch.ones_like(entropy_sum), torch.full_like(entropy_sum, tokens), counts_E.sum().float(),
                dropped.float(), entropy_sum, *(losses.get(k, zero).detach().float() for k in SCALARS[5:])])
            row = torch.cat([counts_E.float(), scalars])
            self.buf = row if self.buf is None else self.buf + row

    def take(self, device: torch.device) -> torch.Tensor:
        row = self.buf if self.buf is not None else torch.zeros(self.num_experts + len(SCALARS), device=device)
        self.buf = None
        return row


def finish_step(layers: list[nn.Module], device: torch.device, update_bias: bool = True,
                group: dist.ProcessGroup | None = None, layer_ids: list[int] | None = None,
                num_experts: int | None = None) -> dict:
    """Reduce this step's statistics over all ranks, update balancing biases, summarise.

    `layer_ids` (every MoE layer of the whole model) and `num_experts` fix the shape of the
    reduced tensor, so a rank that holds only some of the layers, or none (a pipeline stage),
    still takes part and nobody hangs; by default they come from `layers`.
    Returns {"aux_loss": mean total auxiliary loss summed over layers, "layers": [per-layer dict]}.
    NOTE: one all-reduce and one host sync per step, for all layers together.
    """
    held = {layer.layer_id: layer for layer in layers}
    ids = sorted(layer_ids) if layer_ids is not None else sorted(held)
    if not ids:
        return {}
    E = num_experts if num_experts is not None else layers[0].stats.num_experts
    width = E + len(SCALARS)
    table = torch.stack([held[i].stats.take(device) if i in held else torch.zeros(width, device=device)
                         for i in ids])  # [L, E + S]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(table, group=group)
    if update_bias:
        for i, counts_E in zip(ids, table[:, :E]):
            if i in held:
                held[i].update_bias(counts_E)
    bias_LE = torch.stack([held[i].router.expert_bias if i in held and hasattr(held[i].router, "expert_bias")
                           else torch.zeros(E, device=table.device) for i in ids])
    rows = torch.cat([table, bias_LE.to(table.dtype)], dim=1).cpu().tolist()  # the one host sync
    summary = []
    for i, row in zip(ids, rows):
        counts = row[:E]
        s = dict(zip(SCALARS, row[E:E + len(SCALARS)]))
        fw = max(s["forwards"], 1.0)
        mean = sum(counts) / E
        has_bias = i in held and (held[i].cfg.bias_update_rate > 0 or held[i].cfg.selection_bias)
        summary.append({
            "layer": i,
            "tokens_per_expert": counts,
            "imbalance": max(counts) / mean if mean else 0.0,
            "cv": math.sqrt(sum((c - mean) ** 2 for c in counts) / E) / mean if mean else 0.0,
            "dead_experts": sum(c == 0 for c in counts),
            "dropped_frac": s["dropped"] / s["assignments"] if s["assignments"] else 0.0,
            "router_entropy": s["entropy_sum"] / s["tokens"] if s["tokens"] else 0.0,
            "lb_loss": s["lb_loss"] / fw, "seq_lb_loss": s["seq_lb_loss"] / fw, "z_loss": s["z_loss"] / fw,
            "aux_loss": s["aux_total"] / fw,
            "bias": row[E + len(SCALARS):] if has_bias else [],
        })
    return {"aux_loss": sum(r["aux_loss"] for r in summary), "layers": summary}
