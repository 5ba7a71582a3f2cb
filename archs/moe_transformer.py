"""The transformer with MoE FFNs at chosen layers (every n-th, or an explicit list)."""
from __future__ import annotations

from dataclasses import dataclass, field

import archs
from archs.common import residual_scale
from archs.transformer import Transformer, TransformerConfig
from cluster.configio import doc
from moe.config import MoEConfig
from moe.layer import MoELayer


@dataclass
class MoETransformerConfig(TransformerConfig):
    arch: str = doc("architecture family (registry key)", "moe_transformer")
    moe: MoEConfig = field(default_factory=MoEConfig, metadata={"help": "the MoE layers"})
    moe_every: int = doc("MoE FFN in layers n-1, 2n-1, ... (1 = every layer, 2 = every other)", 1)
    moe_layers: list[int] | None = doc("explicit MoE layer indices, e.g. [1, 3]; overrides moe_every", None)

    def __post_init__(self):
        super().__post_init__()
        if self.moe_every < 1:
            raise ValueError(f"moe_every: must be >= 1, got {self.moe_every}")
        bad = [i for i in self.moe_layers or [] if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"moe_layers: {bad} outside [0, n_layers={self.n_layers})")

    @property
    def moe_layer_ids(self) -> list[int]:
        if self.moe_layers is not None:
            return sorted(set(self.moe_layers))
        return [i for i in range(self.n_layers) if (i + 1) % self.moe_every == 0]


class MoETransformer(Transformer):
    def __init__(self, cfg: MoETransformerConfig):
        super().__init__(cfg)
        for i in cfg.moe_layer_ids:
            layer = MoELayer(cfg.d_model, cfg.moe, layer_id=i)
            layer.init_weights(cfg.init_std, residual_scale(cfg.init_std, cfg.n_layers))
            self.layers[str(i)].mlp = layer

    def new_cache(self, *args, **kwargs):
        if self.cfg.moe.router == "expert_choice":
            raise ValueError("expert-choice routing is non-causal (each expert picks from the whole batch), "
                             "so it cannot generate token by token; train with model.moe.router: topk")
        return super().new_cache(*args, **kwargs)

    def flops_per_token(self, seq_len: int) -> float:
        """Active FLOPs: each token runs top_k experts (plus the router and shared expert)."""
        total = super().flops_per_token(seq_len)
        m = self.cfg.moe
        for i in self.cfg.moe_layer_ids:
            experts = self.layers[str(i)].mlp.experts  # this rank's experts (all, without EP)
            per_expert = experts.w13[0].numel() + experts.w2[0].numel()
            total -= 6 * per_expert * (experts.num_experts - m.top_k)  # counted for every held expert above
        return total


PRESETS = {
    "debug": dict(max_seq_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                  moe=dict(num_experts=4, top_k=2, expert_hidden=32)),
    "small": dict(max_seq_len=256, d_model=256, n_layers=4, n_heads=4,
                  moe=dict(num_experts=8, top_k=2, expert_hidden=352)),
}

archs.register("moe_transformer", MoETransformerConfig, MoETransformer, PRESETS)
