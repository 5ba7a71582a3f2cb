"""Grouped matmul for MoE experts: `grouped_mm(x, w, group_sizes, backend)` over several backends.

Importing this package imports only torch: grouped_gemm is loaded by the `megablocks` backend
when it is first asked about a CUDA device. Shapes and backends: kernels/README.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
# CUDA: grouped_gemm's kernels (MegaBlocks' default), then torch's, then the loop (a slow path:
# `Choice.slow` is True and the training loop warns; unmeasured on a GPU so far).
AUTO_ORDER = {
    "cpu": ("grouped", "loop"),
    "cuda": ("megablocks", "grouped", "loop"),
}
_DEFAULT_ORDER = ("grouped", "loop")
_COMPARISON_ONLY = "not considered by auto (a comparison backend; ask for it by name)"


class BackendUnavailable(RuntimeError):
    """A known backend that cannot run on this device/dtype/installation."""


@dataclass(frozen=True)
class Choice:
    """What `auto` (or an explicit name) resolves to on one (device, dtype, widths), and why."""
    requested: str
    backend: str
    device_type: str
    dtype: torch.dtype
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it does not run here

    @property
    def slow(self) -> bool:
        """`auto` fell back to the per-expert loop on a GPU (one launch per expert, a host sync)."""
        return self.requested == "auto" and self.backend == "loop" and self.device_type == "cuda"

    def describe(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        head = f"MoE kernel backend {self.backend} on {self.device_type}/{dt} (asked: {self.requested})"
        if not self.skipped:
            return head
        return head + "; skipped: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())


def _shape_reason(name: str, dtype: torch.dtype, widths: tuple[int, ...]) -> str | None:
    if name == "grouped" and widths:
        per = grouped.ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
        bad = [w for w in widths if w % per]
        if bad:
            return f"widths {bad} are not multiples of {per} ({dtype} needs 16-byte strides)"
    return None


def available_backends(device, dtype: torch.dtype) -> list[str]:
    """Concrete backends that can run on (device, dtype) here."""
    return [name for name, (_, reason) in _REGISTRY.items() if reason(torch.device(device), dtype) is None]


_CHOICES: dict[tuple, Choice] = {}


def choose_backend(name: str, device, dtype: torch.dtype, widths: tuple[int, ...] = ()) -> Choice:
    """The concrete backend `name` means on (device, dtype) for operands of these widths (d_in and
    d_out of every grouped matmul), with the reason each other candidate was skipped. Cached.

    Raises ValueError for an unknown name, BackendUnavailable (with the reason) if it cannot run.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    device = torch.device(device)
    key = (name, device.type, dtype, tuple(widths))
    if key in _CHOICES:
        return _CHOICES[key]
    order = AUTO_ORDER.get(device.type, _DEFAULT_ORDER) if name == "auto" else (name,)
    skipped: dict[str, str] = {}
    chosen = None
    for candidate in order:
        reason = _REGISTRY[candidate][1](device, dtype) or _shape_reason(candidate, dtype, widths)
        if reason is None:
            chosen = candidate
            break
        skipped[candidate] = reason
    if chosen is None:
        if name == "auto":
            raise BackendUnavailable(f"no kernel backend runs on {device.type}/{dtype}: {skipped}")
        raise BackendUnavailable(f"kernel backend {name!r} is unavailable: {skipped[name]}")
    if name == "auto":
        for b in _REGISTRY:
            if b not in order:
                skipped[b] = _REGISTRY[b][1](device, dtype) or _shape_reason(b, dtype, widths) or _COMPARISON_ONLY
    _CHOICES[key] = choice = Choice(name, chosen, device.type, dtype, skipped)
    return choice


def check_requested(name: str, device_type: str, dtype: torch.dtype, widths: tuple[int, ...] = ()) -> None:
    """Raise BackendUnavailable (with the reason and install hint) if an explicitly requested
    backend cannot run where the workers will: for a config check on the driver, before any
    worker starts. `auto` always resolves. CPU, or CUDA on a driver that has a GPU itself: the
    full check. CUDA workers from a driver without one: what the driver can know (the package
    is installed, the dtype and widths fit); the kernel's trial runs on the worker."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "auto":
        return
    if device_type != "cuda" or torch.cuda.is_available():
        choose_backend(name, device_type, dtype, widths)
        return
    reason = _shape_reason(name, dtype, widths)
    if name == "megablocks":
        if dtype not in megablocks.SUPPORTED_DTYPES:
            reason = f"grouped_gemm supports {megablocks.SUPPORTED_DTYPES}, got {dtype} (use precision bf16)"
        elif not megablocks.installed():
            reason = "grouped_gemm is not installed; " + megablocks.INSTALL_HINT
    elif name == "grouped" and not hasattr(torch, "_grouped_mm"):
        reason = f"torch {torch.__version__} has no torch._grouped_mm"
    if reason is not None:
        raise BackendUnavailable(f"kernel backend {name!r} is unavailable on cuda: {reason}")


def resolve_backend(name: str, device, dtype: torch.dtype) -> str:
    """The concrete backend `name` means on (device, dtype), widths aside; see `choose_backend`."""
    return choose_backend(name, device, dtype).backend


class _ZeroEmptyGroupGrads(torch.autograd.Function):
    """Identity on w [G, I, O]; in backward, the gradient of every group with no rows is set to
    exactly zero. Kernels have left such slices uninitialised (grouped_gemm issue #36; torch's
    grouped GEMM with zero-size groups), so the guarantee lives here, not in each kernel."""

    @staticmethod
    def forward(ctx, w_GIO, sizes_G):
        ctx.save_for_backward(sizes_G)
        return w_GIO.view_as(w_GIO)

    @staticmethod
    def backward(ctx, dw_GIO):
        (sizes_G,) = ctx.saved_tensors
        nonempty_G = (sizes_G > 0).to(device=dw_GIO.device, non_blocking=True)
        # where, not multiply: uninitialised memory may hold NaN, and NaN * 0 is NaN.
        return torch.where(nonempty_G[:, None, None], dw_GIO, dw_GIO.new_zeros(())), None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Per-group matmul: rows of group g (already contiguous, in group order) times w[g].

    x [N, I], w [G, I, O], group_sizes [G] integers summing to N (zeros allowed; CPU or device)
    -> [N, O]. Differentiable in x and w; a group with no rows gets a zero weight gradient
    whatever the backend.
    """
    check_inputs(x, w, group_sizes)
    name = choose_backend(backend, x.device, x.dtype, (x.shape[1], w.shape[2])).backend
    if w.requires_grad and torch.is_grad_enabled():
        w = _ZeroEmptyGroupGrads.apply(w, group_sizes)
    return _REGISTRY[name][0](x, w, group_sizes)


__all__ = ["BACKENDS", "BackendUnavailable", "Choice", "available_backends", "check_requested", "choose_backend",
           "grouped_mm", "resolve_backend"]
