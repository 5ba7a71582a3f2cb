"""Routed experts: E SwiGLU MLPs whose matmuls run as grouped GEMMs over expert-sorted rows."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import grouped_mm


class GroupedExperts(nn.Module):
    """w13 [E, C, 2F] (gate and up projections fused into one GEMM), w2 [E, F, C].

    Under expert parallelism a rank holds a contiguous slice of the experts; `num_experts` is
    then the local count.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden, self.backend = num_experts, hidden, backend
        self.w13 = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def forward(self, x_MC: torch.Tensor, group_sizes_E: torch.Tensor) -> torch.Tensor:
        gate_MF, up_MF = grouped_mm(x_MC, self.w13, group_sizes_E, self.backend).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate_MF) * up_MF, self.w2, group_sizes_E, self.backend)
