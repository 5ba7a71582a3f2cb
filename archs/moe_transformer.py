"""The transformer with MoE FFNs at chosen layers (every n-th, or an explicit list)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from archs.common import residual_scale
from archs.ffn import check_causal_routing, make_ffn
from archs.registry import register
from archs.transformer import Transformer, TransformerConfig
from moe.config import MoEConfig


@dataclass
class MoETransformerConfig(TransformerConfig):
    arch: Annotated[str, "architecture family (registry key)"] = "moe_transformer"
    moe: Annotated[MoEConfig, "the MoE layers"] = field(default_factory=MoEConfig)
    moe_every: Annotated[int, "MoE FFN in layers n-1, 2n-1, ... (1 = every layer, 2 = every other)"] = 1
    moe_layers: Annotated[list[int] | None, "explicit MoE layer indices, e.g. [1, 3]; overrides moe_every"] = None

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
            self.layers[str(i)].mlp = make_ffn(cfg.d_model, cfg.hidden, cfg, i, cfg.init_std,
                                               residual_scale(cfg.init_std, cfg.n_layers))

    def new_cache(self, *args, **kwargs):
        check_causal_routing(self.cfg.moe)
        return super().new_cache(*args, **kwargs)


PRESETS = {
    "debug": dict(max_seq_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                  moe=dict(num_experts=4, top_k=2, expert_hidden=32)),
    "small": dict(max_seq_len=256, d_model=256, n_layers=4, n_heads=4,
                  moe=dict(num_experts=8, top_k=2, expert_hidden=352)),
}

register("moe_transformer", MoETransformerConfig, MoETransformer, PRESETS)
