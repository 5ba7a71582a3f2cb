"""`padded`: capacity-padded batched matmul, the GShard/DeepSpeed way, kept as the comparison.

Rows are scattered into a zero-padded [G, M, I] buffer (M = the largest group), multiplied with
one bmm, and gathered back. Wasted work grows with the imbalance: G * M rows are computed for N.
"""
from __future__ import annotations

import torch

from kernels.common import empty_result, host_sizes


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None if dtype.is_floating_point else f"needs a floating dtype, got {dtype}"


def slot_index(sizes_G: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, int]:
    """For each row, its slot g * M + (position within group g) in the flattened [G * M] buffer."""
    # NOTE: host sync for M (the buffer shape must be known on the host).
    sizes = host_sizes(sizes_G, num_rows)
    max_size = max(sizes)
    sizes_G = sizes_G.to(torch.long)
    starts_G = torch.cumsum(sizes_G, 0) - sizes_G
    group_N = torch.repeat_interleave(torch.arange(len(sizes), device=sizes_G.device), sizes_G,
                                      output_size=num_rows)
    pos_N = torch.arange(num_rows, device=sizes_G.device) - starts_G[group_N]
    return group_N * max_size + pos_N, max_size


def padded_mm(x_NI: torch.Tensor, w_GIO: torch.Tensor, sizes_G: torch.Tensor) -> torch.Tensor:
    """Same contract as `loop_mm`: x [N, I] sorted by group, w [G, I, O] -> [N, O]."""
    num_rows, num_groups = x_NI.shape[0], w_GIO.shape[0]
    slot_N, max_size = slot_index(sizes_G, num_rows)
    if num_rows == 0:
        return empty_result(x_NI, w_GIO)
    slot_N = slot_N.to(x_NI.device)
    # NOTE: padding: G * M rows of zeros are allocated and multiplied.
    buf_GMI = x_NI.new_zeros(num_groups * max_size, x_NI.shape[1]).index_copy(0, slot_N, x_NI)
    y_GMO = torch.bmm(buf_GMI.view(num_groups, max_size, -1), w_GIO)
    return y_GMO.reshape(num_groups * max_size, -1).index_select(0, slot_N)
