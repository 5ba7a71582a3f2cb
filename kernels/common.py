"""Checks and host-side helpers shared by the backends."""
from __future__ import annotations

import torch


def check_inputs(x_NI: torch.Tensor, w_GIO: torch.Tensor, sizes_G: torch.Tensor) -> None:
    """Shape and dtype checks that need no host sync."""
    if x_NI.dim() != 2 or w_GIO.dim() != 3:
        raise ValueError(f"expected x [N, d_in] and w [G, d_in, d_out], got {tuple(x_NI.shape)} and {tuple(w_GIO.shape)}")
    if x_NI.shape[1] != w_GIO.shape[1]:
        raise ValueError(f"d_in mismatch: x has {x_NI.shape[1]}, w has {w_GIO.shape[1]}")
    if sizes_G.shape != (w_GIO.shape[0],):
        raise ValueError(f"group_sizes must have shape [G]=[{w_GIO.shape[0]}], got {tuple(sizes_G.shape)}")
    if sizes_G.dtype.is_floating_point or sizes_G.dtype == torch.bool:
        raise ValueError(f"group_sizes must be an integer tensor, got {sizes_G.dtype}")
    if x_NI.dtype != w_GIO.dtype:
        raise ValueError(f"x and w dtypes differ: {x_NI.dtype} vs {w_GIO.dtype}")


def host_sizes(sizes_G: torch.Tensor, num_rows: int) -> list[int]:
    """group_sizes as a Python list, validated against the row count.

    NOTE: host sync (one device-to-host copy) when group_sizes lives on the device.
    """
    sizes = [int(s) for s in sizes_G.tolist()]
    if any(s < 0 for s in sizes) or sum(sizes) != num_rows:
        raise ValueError(f"group_sizes must be >= 0 and sum to N={num_rows}, got {sizes}")
    return sizes


def empty_result(x_NI: torch.Tensor, w_GIO: torch.Tensor) -> torch.Tensor:
    """The [0, d_out] result for N = 0, still connected to x and w so both get (zero) gradients."""
    return x_NI @ w_GIO[0]
