"""The FFN slot every family shares: a dense SwiGLU, or an MoE layer when the config asks for one.

A family config that can carry MoE layers inherits `MoEOptions` (fields `moe`, `moe_every`,
`moe_layers`) and builds each FFN with `make_ffn`. The training loop, checkpoints and metrics find
MoE layers through `cfg.moe` and `cfg.moe_layer_ids`, whatever the family; layer ids are global
(unique in the model) because statistics and metrics are keyed by them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from archs.common import SwiGLU
from cluster.configio import doc
from moe.config import MoEConfig


@dataclass
class MoEOptions:
    moe: MoEConfig | None = doc("MoE FFNs (a mapping of MoE fields); null = every FFN dense", None)
    moe_every: int = doc("with moe set: MoE FFN in FFN slots n-1, 2n-1, ... (1 = every slot)", 1)
    moe_layers: list[int] | None = doc("with moe set: explicit FFN slot indices that are MoE; overrides moe_every", None)

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
    """FFN slot `slot` (a global index): an `MoELayer` if the config routes it, else SwiGLU."""
    if cfg.moe is not None and slot in cfg.moe_layer_ids:
        from moe.layer import MoELayer  # moe imports archs.common: import lazily

        layer = MoELayer(d_model, cfg.moe, layer_id=slot)
        layer.init_weights(std, out_std)
        return layer
    return SwiGLU(d_model, hidden)
