"""`loop`: one matmul per group. The reference every other backend is tested against."""
from __future__ import annotations

import torch

from kernels.common import host_sizes


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None if dtype.is_floating_point else f"needs a floating dtype, got {dtype}"


def loop_mm(x_NI: torch.Tensor, w_GIO: torch.Tensor, sizes_G: torch.Tensor) -> torch.Tensor:
    """y[rows of g] = x[rows of g] @ w[g]; x [N, I] sorted by group, w [G, I, O] -> [N, O]."""
    # NOTE: reads group_sizes on the host (one sync) to split the rows.
    sizes = host_sizes(sizes_G, x_NI.shape[0])
    # unbind, not w[g]: each w[g]'s backward would allocate a zero [G, I, O] gradient (G^2 I O work).
    return torch.cat([chunk @ w_IO for chunk, w_IO in zip(torch.split(x_NI, sizes), w_GIO.unbind(0))])
