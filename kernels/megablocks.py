"""`megablocks`: MegaBlocks' grouped GEMM (`grouped_gemm.ops.gmm`) on CUDA, imported only when used.

`gmm(a [N, I], b [G, I, O], batch_sizes [G], trans_b=False) -> [N, O]` is an autograd function
(its backward calls the same kernel for dx and dw). Its checks (grouped_gemm csrc): a and b
contiguous CUDA bf16, batch_sizes an int64 tensor on the CPU; and it asserts that not every
batch size is zero. Install: README "GPU install" (megablocks pins an old torch, so no extra).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import torch

from kernels.common import check_inputs, empty_result

SUPPORTED_DTYPES = (torch.bfloat16,)
INSTALL_HINT = ("install grouped_gemm (and megablocks) as in README \"GPU install\": "
                "pip install --no-deps --no-build-isolation stanford-stk==0.7.1 grouped_gemm==0.3.0 megablocks==0.10.0")


def _importable(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def is_available() -> bool:
    """CUDA present and grouped_gemm (or megablocks) installed; imports nothing."""
    return torch.cuda.is_available() and (_importable("grouped_gemm") or _importable("megablocks"))


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return f"megablocks kernels need a CUDA device (got {torch.device(device).type}); " + INSTALL_HINT
    if not (_importable("grouped_gemm") or _importable("megablocks")):
        return "grouped_gemm is not installed; " + INSTALL_HINT
    if dtype not in SUPPORTED_DTYPES:
        return f"grouped_gemm supports {SUPPORTED_DTYPES}, got {dtype}"
    return None


def load_gmm():
    """grouped_gemm's `gmm`, from grouped_gemm itself or through megablocks' re-export."""
    try:
        return importlib.import_module("grouped_gemm.ops").gmm
    except ImportError:
        pass
    try:
        util = importlib.import_module("megablocks.grouped_gemm_util")
    except ImportError as err:
        raise RuntimeError("megablocks backend: grouped_gemm is not importable; " + INSTALL_HINT) from err
    if util.ops is None:
        raise RuntimeError("megablocks backend: megablocks found no grouped_gemm; " + INSTALL_HINT)
    return util.ops.gmm


def gmm_args(x_NI: torch.Tensor, w_GIO: torch.Tensor, sizes_G: torch.Tensor,
             dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES):
    """Translate our arguments into gmm's: contiguous operands, batch_sizes int64 on the CPU."""
    check_inputs(x_NI, w_GIO, sizes_G)
    if x_NI.dtype not in dtypes:
        raise ValueError(f"megablocks backend: grouped_gemm supports {dtypes}, got {x_NI.dtype}")
    # NOTE: host sync when group_sizes lives on the GPU: grouped_gemm reads batch sizes on the host.
    return x_NI.contiguous(), w_GIO.contiguous(), sizes_G.to(device="cpu", dtype=torch.int64)


def megablocks_mm(x_NI: torch.Tensor, w_GIO: torch.Tensor, sizes_G: torch.Tensor) -> torch.Tensor:
    """x [N, I] sorted by group, w [G, I, O] -> [N, O] through grouped_gemm's `gmm`."""
    a, b, batch_sizes = gmm_args(x_NI, w_GIO, sizes_G)
    if a.shape[0] == 0:
        return empty_result(x_NI, w_GIO)  # gmm asserts that some batch size is nonzero
    return load_gmm()(a, b, batch_sizes, trans_b=False)
