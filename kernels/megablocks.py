"""`megablocks`: MegaBlocks' grouped GEMM (`grouped_gemm.ops.gmm`) on CUDA, imported only when used.

`gmm(a [N, I], b [G, I, O], batch_sizes [G], trans_b=False) -> [N, O]` is an autograd function
(its backward calls the same kernel for dx and dw). Its checks (grouped_gemm csrc): a and b
contiguous CUDA bf16, batch_sizes an int64 tensor on the CPU; and it asserts that not every
batch size is zero. Only `grouped_gemm` is needed (MegaBlocks itself re-exports the same `gmm`
and pins an old torch): install as in README "GPU install".

The backend is available only where `grouped_gemm.ops.gmm` actually imports (a CUDA device
present; the import is tried once, on the first question about a CUDA device).
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from kernels.common import check_inputs, empty_result

SUPPORTED_DTYPES = (torch.bfloat16,)
INSTALL_HINT = ("install grouped_gemm as in README \"GPU install\": "
                "pip install --no-deps --no-build-isolation grouped_gemm==0.3.0 (builds its CUDA kernels; needs nvcc)")

_GMM: list = []        # [gmm] once imported
_IMPORT_ERROR: list = []  # [reason] once an import failed


def installed() -> bool:
    """grouped_gemm is on the path (imports nothing: a driver without a GPU can ask)."""
    try:
        return importlib.util.find_spec("grouped_gemm") is not None
    except (ImportError, ValueError):
        return False


def _import_reason() -> str | None:
    """None if `grouped_gemm.ops.gmm` imports, else why not (tried once per process)."""
    if _GMM:
        return None
    if not _IMPORT_ERROR:
        try:
            _GMM.append(importlib.import_module("grouped_gemm.ops").gmm)
            return None
        except Exception as err:  # noqa: BLE001 - a broken build raises OSError/AttributeError too
            _IMPORT_ERROR.append(f"grouped_gemm.ops.gmm does not import ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''})")
    return _IMPORT_ERROR[0]


def is_available() -> bool:
    """CUDA present and `grouped_gemm.ops.gmm` imports."""
    return torch.cuda.is_available() and _import_reason() is None


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return f"needs a CUDA device (got {torch.device(device).type}); " + INSTALL_HINT
    if dtype not in SUPPORTED_DTYPES:
        return f"grouped_gemm supports {SUPPORTED_DTYPES}, got {dtype}"
    reason = _import_reason()
    return None if reason is None else f"{reason}; {INSTALL_HINT}"


def load_gmm():
    """grouped_gemm's `gmm`; RuntimeError with the install hint if it does not import."""
    reason = _import_reason()
    if reason is not None:
        raise RuntimeError(f"megablocks backend: {reason}; {INSTALL_HINT}")
    return _GMM[0]


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
