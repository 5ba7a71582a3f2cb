"""Build a model on the meta device and let each rank materialise only its shards, with the very
values the ordinary (unsharded) build gives for the same seed, buffers included.

How: the model's constructor runs once on the meta device under a dispatch-mode recorder that
keeps every aten op it issues (`trace_build`). Then `parallel.apply` shards the meta model, and
`materialize` replays the recorded ops on the CPU in order, after the same `torch.manual_seed`:
the random fills (nn.Linear's kaiming init, the normal_ of `init_weights`, the experts' init)
therefore draw exactly what the ordinary build drew. A parameter's storage is only allocated for
the op that writes it, at full size, and dropped as soon as its next access overwrites it whole
(a Linear's kaiming values, overwritten by `init_weights`), or, after its last write, cut to this
rank's shard (expert-parallel slice, then the FSDP shard) and copied into the sharded parameter.
So the peak is this rank's shards plus one full parameter, not the model. Everything else the
constructor computes (RoPE tables, buffers, small intermediates) is replayed as it was.

NOTE: only ops that overwrite a parameter's whole storage may write it before its last value
(normal_, uniform_, zero_, fill_, ...); a constructor that writes part of a parameter, or reads
Python values out of a tensor (`.item()`), is refused with the op named.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten
# In-place ops that overwrite the whole tensor they are given without reading it.
OVERWRITE = {aten.normal_.default, aten.uniform_.default, aten.zero_.default, aten.fill_.Scalar,
             aten.fill_.Tensor, aten.random_.default, getattr(aten.random_, "from"), aten.random_.to,
             aten.exponential_.default, aten.bernoulli_.float, aten.copy_.default}
FACTORIES = {aten.empty.memory_format, aten.empty_strided.default}
META = torch.device("meta")
CPU = torch.device("cpu")


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []  # (func, args, kwargs, out): strong references keep the keys unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class Trace:
    """A model built on the meta device and the ops its constructor issued."""

    def __init__(self, model: nn.Module, ops: list[tuple]):
        self.model, self.ops = model, ops
        # The full model's parameter and buffer names by storage, before anything cuts it.
        self.param_of = {_key(p): n for n, p in model.named_parameters()}
        self.buffers = dict(model.named_buffers())  # the meta buffers: their storages and layouts


def trace_build(build: Callable[[], nn.Module]) -> Trace:
    with torch.device(META), _Recorder() as rec:
        model = build()
    return Trace(model, rec.ops)


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def materialize(trace: Trace, model: nn.Module, seed: int | torch.Tensor,
                place: Callable[[str, torch.Tensor], torch.Tensor | None], device: torch.device = CPU) -> None:
    """Give `model` (the traced model after `parallel.apply`, still on meta) real values.

    `seed`: the seed (or `torch.get_rng_state()`) the ordinary build would have started from.
    `place(name, full)` returns what this rank keeps of the full parameter `name` (its EP slice),
    or None if the rank does not hold it (another pipeline stage). FSDP/TP shards are then cut
    from that by the parameter's own placements.
    """
    ops = trace.ops
    # Every op's storages, to know when a storage is accessed next.
    accesses: dict[int, list[int]] = {}
    for i, (_, args, kwargs, out) in enumerate(ops):
        for t in _tensors((args, kwargs)) + _tensors(out):
            k = _key(t)
            if not accesses.get(k) or accesses[k][-1] != i:
                accesses.setdefault(k, []).append(i)
    # NOTE: to_empty swaps DTensor parameters' contents (their __dict__ too), which drops the tags
    # parallel.apply set on them (norm_copies, expert groups...): keep and restore them.
    tags = {n: {k: v for k, v in vars(p).items() if not k.startswith("_")} for n, p in model.named_parameters()}
    model.to_empty(device=device)  # FSDP and DTensor parameters get local storage of their shard size
    for n, p in model.named_parameters():
        for k, v in tags.get(n, {}).items():
            if not hasattr(p, k):
                setattr(p, k, v)
    targets = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in model.named_parameters()}
    real: dict[int, torch.Tensor] = {}  # storage key -> a real tensor over that storage (its first view)

    def view(t):
        if not isinstance(t, torch.Tensor):
            return t
        base = real.get(_key(t))
        if base is None:
            raise RuntimeError(f"meta init: a tensor the constructor used before it was written ({tuple(t.shape)})")
        return torch.empty(0, dtype=t.dtype).set_(base.untyped_storage(), t.storage_offset(), t.shape, t.stride())

    def device_to_cpu(x):
        return CPU if isinstance(x, torch.device) and x == META else x

    if isinstance(seed, torch.Tensor):
        torch.set_rng_state(seed)
    else:
        torch.manual_seed(seed)
    for i, (func, args, kwargs, out) in enumerate(ops):
        if func in FACTORIES and all(_key(t) in trace.param_of for t in _tensors(out)):
            continue  # a parameter's storage: allocated only when something writes it (below)
        if func in OVERWRITE and isinstance(args[0], torch.Tensor) and _key(args[0]) not in real:
            dst = args[0]
            if dst.storage_offset() != 0 or dst.numel() * dst.element_size() != dst.untyped_storage().nbytes():
                raise RuntimeError(f"meta init: {func} writes part of a tensor before it exists; build normally")
            real[_key(dst)] = torch.empty_strided(dst.shape, dst.stride(), dtype=dst.dtype)
        in_keys = {_key(t) for t in _tensors((args, kwargs))}
        if in_keys and all(k in trace.param_of and k not in real for k in in_keys) and func not in OVERWRITE \
                and all(_key(t) in in_keys for t in _tensors(out)):
            continue  # a view of a parameter not written yet (nn.Parameter's detach): nothing to replay
        if func is aten._local_scalar_dense.default:
            raise RuntimeError("meta init: the constructor reads a value out of a tensor (.item()); build normally")
        r_args = tree_map(view, tree_map(device_to_cpu, args))
        r_kwargs = tree_map(view, tree_map(device_to_cpu, kwargs))
        r_out = func(*r_args, **r_kwargs)
        for m, r in zip(_tensors(out), _tensors(r_out)):
            real.setdefault(_key(m), r)
        touched = {_key(t) for t in _tensors((args, kwargs)) + _tensors(out)}
        for k in touched:
            if k not in trace.param_of:
                continue
            after = [j for j in accesses[k] if j > i]
            if not after:  # this was the last write: keep this rank's shard, drop the full tensor
                _copy_shard(trace.param_of[k], real.pop(k), targets, place)
            elif ops[after[0]][0] in OVERWRITE and _key(ops[after[0]][1][0]) == k:
                real.pop(k)  # overwritten next: its value is dead (the random draw still happened)
    with torch.no_grad():
        for name, b in model.named_buffers():
            meta = trace.buffers.get(name.replace("_checkpoint_wrapped_module.", ""))
            if meta is not None:
                b.copy_(view(meta))


def _copy_shard(name: str, full: torch.Tensor, targets: dict, place) -> None:
    p = targets.get(name)
    if p is None:
        return
    kept = place(name, full)
    if kept is None:
        return
    with torch.no_grad():
        if isinstance(p, DTensor):
            # Each rank cuts its own part of the full tensor it holds (no communication).
            local = distribute_tensor(kept, p.device_mesh, p.placements, src_data_rank=None)._local_tensor
            p._local_tensor.copy_(local)
        else:
            p.copy_(kept)


def expert_place(model: nn.Module) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """`place` for `materialize`: this rank's slice of every expert tensor (expert parallelism),
    every other parameter whole (FSDP and TP cut theirs by their placements)."""
    from moe.experts import GroupedExperts

    held = {f"{n}.{w}".replace("_checkpoint_wrapped_module.", ""): (getattr(m, "expert_offset", 0), m.num_experts)
            for n, m in model.named_modules() if isinstance(m, GroupedExperts) for w in ("w13", "w2")}

    def place(name: str, full: torch.Tensor) -> torch.Tensor:
        if name in held:
            offset, n = held[name]
            return full[offset:offset + n]
        return full
    return place
