"""Mixed precision: autocast contexts and a dynamic loss scaler for fp16."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def kernel_dtype(precision: str, param_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype the expert GEMMs run in for `precision` (moe.experts casts to autocast's)."""
    return param_dtype if precision == "fp32" else DTYPES[precision]


SLOW_HINT = ("install grouped_gemm (README \"GPU install\") for the megablocks backend, or use bf16 and widths "
             "(d_model, expert_hidden) that are multiples of 8 for torch's grouped GEMM")


def kernel_report(model: torch.nn.Module, precision: str, device: torch.device) -> tuple[list[str], dict]:
    """The MoE kernel backend(s) this run uses, for the log once per run: progress lines (one per
    distinct choice, with the reason for every backend skipped, and a WARNING if `auto` fell back
    to the per-expert loop on a GPU) and a metrics record naming the backend."""
    from moe.layer import moe_layers

    choices = {}
    for layer in moe_layers(model):
        c = layer.experts.choice(device, kernel_dtype(precision, layer.experts.w13.dtype))
        choices.setdefault((c.requested, c.backend, tuple(c.skipped.items())), c)
    if not choices:
        return [], {}
    lines = [f"[raymoe] {c.describe()}" for c in choices.values()]
    slow = [c for c in choices.values() if c.slow]
    if slow:
        lines.append(f"[raymoe] WARNING: MoE backend auto fell back to the per-expert loop on {device.type} "
                     f"(one GEMM per expert and a host sync per layer: slow); {SLOW_HINT}")
    record = {"event": "kernel_backend", "moe_backend": ",".join(sorted({c.backend for c in choices.values()})),
              "kernel_dtype": str(next(iter(choices.values())).dtype).removeprefix("torch."),
              "slow_path": bool(slow),
              "skipped": {k: v for c in choices.values() for k, v in c.skipped.items()}}
    return lines, record


class GemmDtypeRecorder:
    """Context manager recording (op, operand dtypes) of every matmul-like aten op run inside it,
    forward and backward. It sits below autocast in the dispatcher, so these are the dtypes the
    kernels really receive (evidence for the dtype flow; used by tests and `jobs.bench gpu`)."""

    GEMMS = frozenset({"mm", "bmm", "addmm", "_grouped_mm", "matmul", "baddbmm", "addbmm"})

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in recorder.GEMMS:
                    recorder.seen.append((name, tuple(a.dtype for a in args
                                                      if isinstance(a, torch.Tensor) and a.is_floating_point())))
                return func(*args, **(kwargs or {}))

        self.seen: list[tuple[str, tuple[torch.dtype, ...]]] = []
        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def dtypes(self) -> set[torch.dtype]:
        return {d for _, dts in self.seen for d in dts}

    def summary(self) -> dict[str, list[str]]:
        """op -> the distinct operand dtypes it saw, e.g. {"_grouped_mm": ["torch.bfloat16"]}."""
        out: dict[str, set[str]] = {}
        for name, dts in self.seen:
            out.setdefault(name, set()).update(str(d) for d in dts)
        return {k: sorted(v) for k, v in sorted(out.items())}


def autocast(precision: str, device: torch.device):
    """Autocast to bf16/fp16 for `precision`; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class DynamicLossScaler:
    """Scale the loss so fp16 gradients do not underflow; skip steps whose gradients overflow.

    On overflow (inf/nan anywhere, agreed across ranks with one all-reduce) the step is skipped
    and the scale multiplied by `backoff`; after `growth_interval` clean steps it is multiplied
    by `growth`. Disabled (scale 1, never skips) for fp32 and bf16.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth: float = 2.0,
                 backoff: float = 0.5, growth_interval: int = 1000, min_scale: float = 1.0):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth, self.backoff = growth, backoff
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.clean_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_and_check(self, params, group: dist.ProcessGroup | None = None) -> bool:
        """Divide gradients by the scale in place; return True if any gradient is inf/nan."""
        if not self.enabled:
            return False
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        found = torch.zeros((), device=grads[0].device)
        for g in grads:
            g = g._local_tensor if hasattr(g, "_local_tensor") else g  # a DTensor shard (TP, FSDP): its own part
            g.mul_(1.0 / self.scale)
            found = torch.maximum(found, (~torch.isfinite(g)).any().float())
        if dist.is_initialized():
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
        return bool(found.item())  # NOTE: one host sync per step, needed to decide the skip

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.scale * self.backoff, self.min_scale)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.scale *= self.growth
                self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
        assert math.isfinite(self.scale)
