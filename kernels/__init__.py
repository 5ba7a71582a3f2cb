"""Grouped matmul for MoE experts: `grouped_mm(x, w, group_sizes, backend)` over several backends.

Importing this package imports only torch: megablocks, grouped_gemm and triton are loaded by
the `megablocks` backend when it is first called. Shapes and backends: kernels/README.md.
"""
from __future__ import annotations

import torch

from kernels import blocksparse, grouped, loop, megablocks, padded
from kernels.common import check_inputs

BACKENDS = ("auto", "loop", "padded", "grouped", "blocksparse", "megablocks")

# name -> (function(x, w, group_sizes), unavailable_reason(device, dtype) -> str | None)
_REGISTRY = {
    "loop": (loop.loop_mm, loop.unavailable_reason),
    "padded": (padded.padded_mm, padded.unavailable_reason),
    "grouped": (grouped.grouped_mm_torch, grouped.unavailable_reason),
    "blocksparse": (lambda x, w, s: blocksparse.blocksparse_mm(x, w, s), blocksparse.unavailable_reason),
    "megablocks": (megablocks.megablocks_mm, megablocks.unavailable_reason),
}

# Preference of `auto`, fastest first, per device type.
# CPU (2 cores, torch 2.13, fp32, forward+backward; kernels/README.md has the table):
#   N=16384 G=8  I=512 O=2048: grouped 568 ms, loop 583, padded 652, blocksparse 1745, dense 550
#   N=65536 G=64 I=512 O=512:  grouped 593 ms, loop 608, padded 796, blocksparse 1509, dense 571
# grouped is fastest and needs no host sync; loop covers fp64 and unaligned widths.
# CUDA: grouped_gemm's kernels (MegaBlocks' default), then torch's, then the loop.
AUTO_ORDER = {
    "cpu": ("grouped", "loop"),
    "cuda": ("megablocks", "grouped", "loop"),
}
_DEFAULT_ORDER = ("grouped", "loop")


class BackendUnavailable(RuntimeError):
    """A known backend that cannot run on this device/dtype/installation."""


def available_backends(device, dtype: torch.dtype) -> list[str]:
    """Concrete backends that can run on (device, dtype) here; never imports GPU libraries."""
    return [name for name, (_, reason) in _REGISTRY.items() if reason(torch.device(device), dtype) is None]


def resolve_backend(name: str, device, dtype: torch.dtype) -> str:
    """The concrete backend `name` means on (device, dtype); `auto` picks the fastest available.

    Raises ValueError for an unknown name, BackendUnavailable (with the reason) if it cannot run.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    device = torch.device(device)
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, _DEFAULT_ORDER):
            if _REGISTRY[candidate][1](device, dtype) is None:
                return candidate
        raise BackendUnavailable(f"no kernel backend runs on {device.type}/{dtype}")
    reason = _REGISTRY[name][1](device, dtype)
    if reason is not None:
        raise BackendUnavailable(f"kernel backend {name!r} is unavailable: {reason}")
    return name


def grouped_mm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Per-group matmul: rows of group g (already contiguous, in group order) times w[g].

    x [N, I], w [G, I, O], group_sizes [G] integers summing to N (zeros allowed; CPU or device)
    -> [N, O]. Differentiable in x and w.
    """
    check_inputs(x, w, group_sizes)
    name = resolve_backend(backend, x.device, x.dtype)
    if name == "grouped" and backend == "auto" and not grouped.shape_supported(x, w):
        name = "loop"  # torch._grouped_mm needs 16-byte aligned widths
    return _REGISTRY[name][0](x, w, group_sizes)


__all__ = ["BACKENDS", "BackendUnavailable", "available_backends", "grouped_mm", "resolve_backend"]
