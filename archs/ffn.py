"""The FFN slot every family shares: a dense SwiGLU, or an MoE layer when the config asks for one.

A family config that can carry MoE layers inherits `MoEOptions` (fields `moe`, `moe_every`,
`moe_layers`) and builds each FFN with `make_ffn`. The training loop, checkpoints and metrics find
MoE layers through `cfg.moe` and `cfg.moe_layer_ids`, whatever the family; layer ids are global
(unique in the model) because statistics and metrics are keyed by them. `active_matmul_params`
is the parameter count behind every family's `flops_per_token`: an MoE layer counts only the
top_k experts a token runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable

import torch.nn as nn

from moe.config import MoEConfig
from moe.experts import SwiGLU
from moe.layer import MoELayer


@dataclass
class MoEOptions:
    moe: Annotated[MoEConfig | None, "MoE FFNs (a mapping of MoE fields); null = every FFN dense"] = None
    moe_every: Annotated[int, "with moe set: MoE FFN in FFN slots n-1, 2n-1, ... (1 = every slot)"] = 1
    moe_layers: Annotated[list[int] | None, "with moe set: explicit FFN slot indices that are MoE; overrides moe_every"] = None

    def check_moe(self, n_slots: int) -> None:
        """Validate against the family's number of FFN slots (call from __post_init__)."""
        if self.moe_every < 1:
            raise ValueError(f"moe_every: must be >= 1, got {self.moe_every}")
        bad = [i for i in self.moe_layers or [] if not 0 <= i < n_slots]
        if bad:
            raise ValueError(f"moe_layers: {bad} outside the model's FFN slots [0, {n_slots})")
        self._n_slots = n_slots

    @property
    def moe_layer_ids(self) -> list[int]:
        """FFN slot indices that hold MoE layers ([] without `moe`)."""
        if self.moe is None:
            return []
        if self.moe_layers is not None:
            return sorted(set(self.moe_layers))
        return [i for i in range(self._n_slots) if (i + 1) % self.moe_every == 0]


def make_ffn(d_model: int, hidden: int, cfg: MoEOptions, slot: int, std: float, out_std: float) -> nn.Module:
    """FFN slot `slot` (a global index): an `MoELayer` if the config routes it, else SwiGLU.

    `cfg` is any config with `moe` and `moe_layer_ids` (an `MoEOptions`, or the MoE transformer's).
    """
    if cfg.moe is not None and slot in cfg.moe_layer_ids:
        layer = MoELayer(d_model, cfg.moe, layer_id=slot)
        layer.init_weights(std, out_std)
        return layer
    return SwiGLU(d_model, hidden)


def check_causal_routing(moe: MoEConfig | None) -> None:
    """Refuse token-by-token generation with expert-choice routing (call from `new_cache`)."""
    if moe is not None and moe.router == "expert_choice":
        raise ValueError("expert-choice routing is non-causal (each expert picks from the whole batch), "
                         "so it cannot generate token by token; train with model.moe.router: topk")


def active_matmul_params(model: nn.Module, include: Callable[[str, nn.Parameter], bool] | None = None) -> int:
    """Parameters one token multiplies by in the forward pass (6 x this = its matmul training FLOPs).

    Every parameter whose name `include(name, param)` accepts (default: all), except the input
    embedding when the model has a separate `head` (then it is a lookup; a tied head does the
    matmul); each MoE layer counts `top_k` of its experts, not all it holds (under expert
    parallelism a rank holds a slice, and the active count is the same on every rank).
    """
    untied = getattr(model, "head", None) is not None
    n = 0
    for name, p in model.named_parameters():
        if (name == "embed.weight" and untied) or (include is not None and not include(name, p)):
            continue
        n += p.numel()
    for name, m in model.named_modules():
        if not isinstance(m, MoELayer):
            continue
        experts = m.experts
        if include is not None and not include(f"{name}.experts.w13", experts.w13):
            continue
        per_expert = experts.w13[0].numel() + experts.w2[0].numel()
        n -= (experts.num_experts - m.cfg.top_k) * per_expert  # counted above for every held expert
    return n
