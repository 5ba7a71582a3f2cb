"""`grouped`: torch's own grouped matmul, `torch._grouped_mm(x, w, offs=...)`.

Support depends on the running torch, the device and the dtype (torch 2.13 CPU: fp32, bf16,
fp16, not fp64; CUDA: recent GPUs only), so it is detected by a tiny trial call, once per
(device type, dtype). Every operand stride must be a multiple of 16 bytes, i.e. d_in and d_out
multiples of 4 in fp32 or 8 in bf16/fp16.

The backward is our own autograd function calling `_grouped_mm` for dx and dw: torch's
built-in backward fails on CPU when the incoming gradient is not contiguous (e.g. the expanded
gradient of `.sum()`: "Invalid strides/sizes"), so the gradient is made contiguous first.
"""
from __future__ import annotations

import torch

from kernels.common import check_inputs

_SUPPORT: dict[tuple[str, torch.dtype], str | None] = {}
ALIGN_BYTES = 16


def _trial(device_type: str, dtype: torch.dtype) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        x = torch.ones(8, 8, device=device_type, dtype=dtype)
        w = torch.ones(2, 8, 8, device=device_type, dtype=dtype)
        offs = torch.tensor([4, 8], device=device_type, dtype=torch.int32)
        y = torch._grouped_mm(x, w, offs=offs)                 # forward, and dx in backward
        dw = torch._grouped_mm(x.t(), y, offs=offs)            # dw in backward (2D x 2D -> 3D)
        if float(y[0, 0]) != 8.0 or float(dw[0, 0, 0]) != 32.0:
            return "torch._grouped_mm gave a wrong result in the trial call"
    except Exception as err:  # noqa: BLE001 - any failure means "not supported here"
        return f"torch._grouped_mm does not run on {device_type}/{dtype}: {str(err).splitlines()[0]}"
    return None


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    key = (torch.device(device).type, dtype)
    if key not in _SUPPORT:
        _SUPPORT[key] = _trial(*key)
    return _SUPPORT[key]


def shape_supported(x_NI: torch.Tensor, w_GIO: torch.Tensor) -> bool:
    """Whether d_in and d_out meet `_grouped_mm`'s 16-byte stride alignment."""
    per = ALIGN_BYTES // x_NI.element_size()
    return x_NI.shape[1] % per == 0 and w_GIO.shape[2] % per == 0


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI, w_GIO, offs_G):
        ctx.save_for_backward(x_NI, w_GIO, offs_G)
        return torch._grouped_mm(x_NI, w_GIO, offs=offs_G)

    @staticmethod
    def backward(ctx, dy_NO):
        x_NI, w_GIO, offs_G = ctx.saved_tensors
        dy_NO = dy_NO.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch._grouped_mm(dy_NO, w_GIO.transpose(1, 2), offs=offs_G)
        if ctx.needs_input_grad[1]:
            # Groups split the contracted dimension here; an empty group gets zeros.
            dw = torch._grouped_mm(x_NI.t(), dy_NO, offs=offs_G)
        return dx, dw, None


def grouped_mm_torch(x_NI: torch.Tensor, w_GIO: torch.Tensor, sizes_G: torch.Tensor) -> torch.Tensor:
    """x [N, I] sorted by group, w [G, I, O] -> [N, O], no host sync."""
    check_inputs(x_NI, w_GIO, sizes_G)
    if not shape_supported(x_NI, w_GIO):
        per = ALIGN_BYTES // x_NI.element_size()
        raise ValueError(f"grouped backend: d_in={x_NI.shape[1]} and d_out={w_GIO.shape[2]} must be "
                         f"multiples of {per} for {x_NI.dtype} (16-byte strides); use backend='loop'")
    offs_G = torch.cumsum(sizes_G.to(device=x_NI.device), 0).to(torch.int32)
    return _GroupedMM.apply(x_NI.contiguous(), w_GIO, offs_G)


def grouped_mm_builtin(x_NI: torch.Tensor, w_GIO: torch.Tensor, sizes_G: torch.Tensor) -> torch.Tensor:
    """Variant on torch's built-in backward, with a hook making the gradient contiguous."""
    offs_G = torch.cumsum(sizes_G.to(device=x_NI.device), 0).to(torch.int32)
    y_NO = torch._grouped_mm(x_NI.contiguous(), w_GIO, offs=offs_G)
    if y_NO.requires_grad:
        y_NO.register_hook(lambda g: g.contiguous())
    return y_NO
