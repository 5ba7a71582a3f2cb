"""Training checkpoints: sharded model + optimizer (torch.distributed.checkpoint) and train state.

Layout of one checkpoint directory (Ray Train merges every worker's files into it):
  .metadata, __R_0.distcp   model and optimizer, keyed by parameter name (DCP; reshardable)
  train_state.pt            step, data position, scheduler, loss scaler   (rank 0)
  rng_rankR.pt              each rank's torch RNG state
  meta.json                 model config, world size, step                (rank 0, written last)
  manifest_rankR.json       size and SHA-256 of every file rank R wrote   (written after its files)
Each checkpoint is written into a fresh local directory and only becomes the run's latest once
Ray has copied it completely, so a crash while writing never replaces the last good one.
A run may live on local/shared disk or under a URI (`s3://bucket/runs/NAME`): reading a
checkpoint's metadata, the manifest check, the choice of the checkpoint to resume from and `load`
work on either through `cluster.data.storage`. From a bucket, `load` reads only the byte ranges
of the shards its rank's state needs (`RemoteReader`): there is no download of the whole
checkpoint, on any rank.

At scale the checks are spread out. A resuming group verifies a checkpoint once between them:
every rank checks the listing (each file there at its recorded size), hashes every world-th file,
and they agree on the verdict (`choose_resume`). The driver checks only the listing. Hashing it
all on every rank would read a 50 B-parameter checkpoint (~800 GB with Adam state) once per rank.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from cluster.config.typed import to_dict
from cluster.data import storage
from cluster.data.storage import Location

# DCP warns on every single-process save/load (generation, tests); that is the intent there.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

PREFIX = "checkpoint_"
REQUIRED = (".metadata", "train_state.pt", "meta.json")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or does not fit the model being trained."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save(path: str | Path, model: nn.Module, optimizer, train_state: dict, model_cfg: Any,
         rank: int, world_size: int) -> None:
    """Every rank calls this with its own (fresh) directory; Ray merges them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with _without_step_hooks(optimizer):
        model_sd, optim_sd = get_state_dict(model, optimizer)
    split_experts(model, model_sd, optim_sd)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path), no_dist=not _distributed())
    torch.save({"torch": torch.get_rng_state()}, path / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(train_state, path / "train_state.pt")
        meta = {"model": to_dict(model_cfg), "world_size": world_size, "step": train_state["step"]}
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
    # The files this rank wrote (DCP names its shards __RANK_N.distcp), whatever else shares the directory.
    mine = sorted(path.glob(f"__{rank}_*.distcp")) + [path / f"rng_rank{rank}.pt"]
    if rank == 0:
        mine += [path / ".metadata", path / "train_state.pt", path / "meta.json"]
    files = {f.name: _digest(f) for f in mine}
    (path / f"manifest_rank{rank}.json").write_text(json.dumps(files, indent=1))


def save_weights(path: str | Path, model_sd: dict, model_cfg: Any, extra_meta: dict | None = None) -> None:
    """A weights-only checkpoint at step 0 (one process): the starting point of a run whose
    weights come from elsewhere (an imported Hugging Face model). `model_sd` is keyed as `save`
    keys it (experts split per global index). Training loads the weights on any layout and starts
    a fresh optimizer and schedule (see `load`); generation and export read it like any other."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dcp.save({"model": model_sd}, checkpoint_id=str(path), no_dist=True)
    torch.save({"step": 0}, path / "train_state.pt")
    meta = {"model": to_dict(model_cfg), "world_size": 1, "step": 0, "weights_only": True, **(extra_meta or {})}
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    mine = sorted(path.glob("__0_*.distcp")) + [path / ".metadata", path / "train_state.pt", path / "meta.json"]
    (path / "manifest_rank0.json").write_text(json.dumps({f.name: _digest(f) for f in mine}, indent=1))


def read_meta(path: str | Path | Location) -> dict:
    loc = storage.locate(path)
    present = {c.name for c in loc.children()}
    missing = [f for f in REQUIRED if f not in present]
    if missing:
        raise CheckpointError(f"checkpoint {loc.uri} is incomplete (missing {', '.join(missing)}); it was not "
                              "written to the end. Move it aside to resume from the previous one")
    try:
        return json.loads(loc.join("meta.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {loc.uri}: meta.json is corrupt ({e})") from None


def _digest(path: Path | Location) -> dict:
    loc = storage.locate(path)
    h, size = hashlib.sha256(), 0

    def stream() -> None:  # streamed: a shard of a large model never sits in memory whole
        nonlocal h, size
        h, size = hashlib.sha256(), 0
        with loc.fs.open_input_stream(loc.path) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    storage.retrying("read", loc, stream)
    return {"bytes": size, "sha256": h.hexdigest()}


HASH_THREADS = 4
"""Files one rank hashes at once in `verify`."""


def verify(path: str | Path | Location, contents: bool = True, rank: int = 0, world: int = 1) -> dict:
    """Check a checkpoint against its manifests and return its meta. Every file of every rank
    must be present at its recorded size (one listing). With `contents`, the SHA-256 of every
    world-th file (those at index `rank`, `rank + world`, ... in name order) is checked as well.
    A group that calls this with its own rank and world checks every file once between them
    (choose_resume); one process with the defaults checks them all."""
    loc = storage.locate(path)
    meta = read_meta(loc)
    sizes = dict(loc.files())  # one listing (a checkpoint directory is flat)
    # The manifests of the ranks that wrote it (meta.json's world size). Others are left from an
    # earlier save of the same step by more workers (a resume from an older checkpoint re-saves
    # it into the same directory) and are ignored, with the files only they list.
    manifests = [f"manifest_rank{r}.json" for r in range(meta["world_size"])]
    missing = [m for m in manifests if m not in sizes]
    if missing:
        raise CheckpointError(f"checkpoint {loc.uri} is incomplete: {len(manifests) - len(missing)} of "
                              f"{meta['world_size']} ranks' manifests (missing {', '.join(missing[:4])})")
    wanted = {}
    for manifest in manifests:
        try:
            listed = json.loads(loc.join(manifest).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"checkpoint {loc.uri} is corrupt: {manifest} is not JSON ({e})") from None
        if not isinstance(listed, dict) or not all(isinstance(w, dict) and isinstance(w.get("bytes"), int)
                                                   and isinstance(w.get("sha256"), str) for w in listed.values()):
            raise CheckpointError(f"checkpoint {loc.uri} is corrupt: {manifest} is not a manifest "
                                  "(file name -> bytes and sha256)")
        for name, want in listed.items():
            if sizes.get(name) != want["bytes"]:
                raise CheckpointError(f"checkpoint {loc.uri} is corrupt: {name} is missing or differs from "
                                      f"{manifest} ({sizes.get(name)} bytes, recorded {want['bytes']})")
            wanted[name] = (manifest, want)
    if contents:
        share = sorted(wanted)[rank::world]
        # A few files at a time: a rank of a group smaller than the one that wrote the checkpoint
        # may hash hundreds of GB, while the others wait for its verdict in a collective.
        with ThreadPoolExecutor(max(1, min(HASH_THREADS, len(share))), thread_name_prefix="raymoe-hash") as pool:
            digests = pool.map(lambda n: _digest(loc.join(n)), share)
            for name, digest in zip(share, digests):
                manifest, want = wanted[name]
                if digest != want:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise CheckpointError(f"checkpoint {loc.uri} is corrupt: {name} differs from {manifest}")
    return meta


def _group() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _on_every_rank(what: str, fn, ranks: str = "all") -> list:
    """fn()'s outcome as every rank of the default group sees it: a list with one entry per rank,
    each ("ok", value) or ("problem", CheckpointError message), and None for a rank that did not
    run it (`ranks="first"`: only rank 0 runs fn). Any other exception on any rank (storage still
    failing after the retries) is raised on every rank alike, so no rank is left waiting in the
    next collective while another gave up."""
    rank, world = _group()
    outcome = None
    if ranks == "all" or rank == 0:
        try:
            outcome = ("ok", fn())
        except CheckpointError as e:
            outcome = ("problem", str(e))
        except Exception as e:  # noqa: BLE001 - shared with the group below, then raised on every rank
            outcome = ("error", f"rank {rank} could not {what}: {type(e).__name__}: {e}")
    found = [outcome]
    if _distributed():
        found = [None] * world
        dist.all_gather_object(found, outcome)
    errors = [o[1] for o in found if o is not None and o[0] == "error"]
    if errors:
        raise CheckpointError(errors[0] + "; the run was not resumed (rerun it once the storage answers)")
    return found


def _verified(path: Path | Location) -> str | None:
    """None if `path` is intact, else the problem: verified jointly by the group (see verify).
    Every rank returns the same answer, the first problem any rank found."""
    rank, world = _group()
    found = _on_every_rank(f"check {storage.locate(path).uri}",
                           lambda: verify(path, contents=True, rank=rank, world=world))
    return next((o[1] for o in found if o[0] == "problem"), None)


def _shared_listing(run_dir: str | Path | Location) -> list[Path | Location]:
    """list_checkpoints as rank 0 sees it, on every rank: each entry costs the group a collective
    in choose_resume, so the ranks must walk the same list (Ray may delete an old checkpoint
    while they list)."""
    run = storage.locate(run_dir)
    _, names = _on_every_rank(f"list {run.uri}", lambda: [p.name for p in list_checkpoints(run)], "first")[0]
    return [storage.native(run.join(n)) for n in names]


def choose_resume(latest: str | Path | Location | None, run_dir: str | Path | Location) -> Path | Location | None:
    """`latest` if it is intact, else the newest intact older checkpoint of the run (with a
    warning); the corrupt one is left in place for inspection. With `latest` None: the run's
    newest intact checkpoint, or None. Called by every rank of a group at once (a collective
    when torch.distributed is up): they share the hashing and reach the same answer."""
    if latest is None:
        for older in _shared_listing(run_dir):
            problem = _verified(older)
            if problem is None:
                return older
            if _group()[0] == 0:  # every rank knows it; one says it
                print(f"[raymoe] WARNING: {problem}; skipping it (left in place for inspection)", flush=True)
        return None
    latest = storage.locate(latest)
    problem = _verified(latest)
    if problem is None:
        return storage.native(latest)
    for older in _shared_listing(run_dir):
        if older.name >= latest.name or _verified(older) is not None:
            continue
        warnings.warn(f"{problem}; resuming from the previous intact checkpoint {older.name} instead", stacklevel=2)
        if _group()[0] == 0:
            print(f"[raymoe] WARNING: {problem}; resuming from {older.name}", flush=True)
        return older
    raise CheckpointError(f"{problem}, and the run has no older intact checkpoint")


def check_model(meta: dict, model_cfg: Any, path: str | Path) -> None:
    """Raise if the checkpoint was written by a model of another shape."""
    from cluster.config.job import ConfigError, model_from_dict

    saved, now = meta["model"], to_dict(model_cfg)
    try:  # a field added since the checkpoint was written reads as its default, the value that model had
        saved = to_dict(model_from_dict(saved))
    except (ConfigError, ValueError, TypeError):
        pass  # a field since removed or renamed: compare the raw records (and name the difference)
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {now.get(k)!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {path} was written by a different model ({'; '.join(diff)}). "
                              "Use the same model config to resume, or a new cluster.run_name to start over; "
                              "the existing checkpoint was left untouched")


class _without_step_hooks:
    """DCP's get/set_state_dict initialise a fresh optimizer's state with a dummy `step()` (lr 0,
    zero gradients). That step must not fire the step pre-hooks `parallel.apply` installs (the MoE
    statistics reduction and bias update, moe/step.py): it would leave a summary of nothing that
    makes the first real step after a resume skip its own reduction and bias update."""

    def __init__(self, optimizer):
        self.hooks = getattr(optimizer, "_optimizer_step_pre_hooks", None)

    def __enter__(self):
        self.saved = dict(self.hooks) if self.hooks is not None else {}
        if self.hooks is not None:
            self.hooks.clear()

    def __exit__(self, *exc):
        if self.hooks is not None:
            self.hooks.update(self.saved)


def load(path: str | Path | Location, model: nn.Module, optimizer, model_cfg: Any, rank: int, world_size: int) -> dict:
    """Load model, optimizer and RNG into the live objects from a checkpoint directory, local or
    in a bucket (only the parts this rank holds are read); return the train state, or None for a
    weights-only checkpoint (`save_weights`: the model is loaded, the run starts at step 0)."""
    path = storage.native(storage.locate(path))
    meta = read_meta(path)
    check_model(meta, model_cfg, path)
    if meta.get("weights_only"):
        model_sd = get_model_state_dict(model)
        layout = split_experts(model, model_sd)
        state = {"model": model_sd}
        dcp_load(state, path, no_dist=not _distributed())
        merge_experts(layout, state["model"])
        set_model_state_dict(model, state["model"])
        return None
    with _without_step_hooks(optimizer):
        model_sd, optim_sd = get_state_dict(model, optimizer)
    layout = split_experts(model, model_sd, optim_sd)
    state = {"model": model_sd, "optim": optim_sd}
    dcp_load(state, path, no_dist=not _distributed())
    merge_experts(layout, state["model"], state["optim"])
    with _without_step_hooks(optimizer):
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_state = _torch_load(path, "train_state.pt")
    if meta["world_size"] == world_size and storage.locate(path).join(f"rng_rank{rank}.pt").is_file():
        torch.set_rng_state(_torch_load(path, f"rng_rank{rank}.pt")["torch"])
    return train_state


def _torch_load(path: Path | Location, name: str) -> Any:
    return torch.load(io.BytesIO(storage.locate(path).join(name).read_bytes()), weights_only=True)


def load_model_weights(path: str | Path | Location, model: nn.Module, model_cfg: Any) -> None:
    """Model weights only, in one process, whatever layout wrote them (generation, export); from a
    bucket only the model's byte ranges are read, not the optimizer state."""
    path = storage.native(storage.locate(path))
    check_model(read_meta(path), model_cfg, path)
    state = {"model": model.state_dict()}
    layout = split_experts(model, state["model"])
    targets = {k: v.data_ptr() for k, v in state["model"].items()}
    dcp_load(state, path, no_dist=True)
    if all(state["model"][k].data_ptr() == p for k, p in targets.items()):
        return  # DCP read into the model's own storage (the expert entries are views of it): done
    merge_experts(layout, state["model"])  # NOTE: stacks a second copy of the experts
    model.load_state_dict(state["model"])


def expert_layout(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{expert parameter FQN: (global index of its first local expert, local count)}."""
    from moe.experts import GroupedExperts

    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            clean = name.replace("module.", "").replace("_checkpoint_wrapped_module.", "")
            for param in ("w13", "w2"):
                layout[f"{clean}.{param}"] = (getattr(module, "expert_offset", 0), module.num_experts)
    return layout


def split_experts(model: nn.Module, model_sd: dict, optim_sd: dict | None = None) -> dict:
    """Key expert weights (and their optimizer state) by global expert index, in place:
    `...experts.w13` [E_local, ...] becomes `...experts.w13.expert{g}` per expert. Every layout
    writes and reads the same keys, so a checkpoint from EP=2 loads at EP=1 and back, and with or
    without FSDP: an FSDP shard of whole experts (Shard(0)) gives the experts it holds as plain
    tensors, a shard inside the experts (Shard(1)) one DTensor per expert (see `_held`).
    Returns what `merge_experts` needs: {fqn: (first global index, local count, the tensors split)}."""
    layout = {}
    for fqn, (offset, n) in expert_layout(model).items():
        t = model_sd.pop(fqn)
        model_sd.update({f"{fqn}.expert{g}": v for g, v in _held(t, offset, n).items()})
        st = None
        if optim_sd is not None and fqn in optim_sd.get("state", {}):
            st = optim_sd["state"].pop(fqn)
            templates = {k: v for k, v in st.items() if _per_expert(v, n)}
            per_expert = {k: _held(v, offset, n) for k, v in templates.items()}
            for g in _held(t, offset, n):
                optim_sd["state"][f"{fqn}.expert{g}"] = {k: per_expert[k][g] if k in per_expert else v
                                                         for k, v in st.items()}
        layout[fqn] = (offset, n, t, st)
    return layout


def _per_expert(v, n: int) -> bool:
    return torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n


def _held(t: torch.Tensor, offset: int, n: int) -> dict[int, torch.Tensor]:
    """{global expert index: this rank's part of that expert} for a [n, ...] expert tensor whose
    first expert is global expert `offset`: all n rows of a plain tensor; of an FSDP DTensor
    sharded by expert, the rows of its local chunk (torch.chunk sizes); of one sharded inside the
    experts, every expert as a DTensor of its own (its dim 0 = the sharded dim 1)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return {offset + j: t[j] for j in range(n)}
    local = t._local_tensor
    dims = [(i, pl.dim) for i, pl in enumerate(t.placements) if isinstance(pl, Shard)]
    if len(dims) != 1:
        raise CheckpointError(f"expert tensor sharded as {t.placements}: one Shard placement expected")
    mesh_dim, dim = dims[0]
    if dim == 0:
        size, coord = t.device_mesh.size(mesh_dim), t.device_mesh.get_local_rank(mesh_dim)
        first = coord * -(-n // size)
        return {offset + first + j: local[j] for j in range(local.shape[0])}
    placements = [Shard(pl.dim - 1) if isinstance(pl, Shard) else pl for pl in t.placements]
    return {offset + j: DTensor.from_local(local[j], t.device_mesh, placements, run_check=False, shape=t.shape[1:],
                                           stride=torch.empty(t.shape[1:], device="meta").stride())
            for j in range(n)}


def _join(template: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `_held`: the loaded parts back into a tensor laid out like `template`."""
    from torch.distributed.tensor import DTensor

    if not isinstance(template, DTensor):
        return torch.stack(parts)
    locals_ = [p._local_tensor if isinstance(p, DTensor) else p for p in parts]
    local = torch.stack(locals_) if locals_ else template._local_tensor  # an empty shard holds none
    return DTensor.from_local(local, template.device_mesh, template.placements, run_check=False,
                              shape=template.shape, stride=template.stride())


def merge_experts(layout: dict, model_sd: dict, optim_sd: dict | None = None) -> None:
    """Inverse of split_experts, after loading into the per-expert entries."""
    for fqn, entry in layout.items():
        # `expert_layout`'s (offset, count) for plain whole tensors, or `split_experts`' full entry
        offset, n, template, optim_state = entry if len(entry) == 4 else (*entry, None, None)
        held = list(_held(template, offset, n)) if template is not None else list(range(offset, offset + n))
        keys = [f"{fqn}.expert{g}" for g in held]
        parts = [model_sd.pop(k) for k in keys]
        model_sd[fqn] = _join(template, parts) if template is not None else torch.stack(parts)
        if optim_sd is not None and keys and keys[0] in optim_sd.get("state", {}):
            parts = [optim_sd["state"].pop(k) for k in keys]
            optim_sd["state"][fqn] = {k: _join(optim_state[k], [p[k] for p in parts]) if _per_expert(optim_state[k], n)
                                      else v for k, v in parts[0].items()}
        elif optim_sd is not None and optim_state is not None:  # an FSDP shard that holds no expert
            optim_sd.setdefault("state", {})[fqn] = optim_state


class _ArrowFileSystem(FileSystemBase):
    """DCP's file-system interface over the pyarrow filesystem of a checkpoint at `root`, for
    reading only. `.metadata` comes in one GET (unpickling it makes many small reads). A shard
    file is opened once for random access and kept open for the reader's ranged reads."""

    def __init__(self, root: Location):
        self.root = root
        self.files: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _rel(self, path) -> str:
        return str(path)[len(self.root.path.rstrip("/")) + 1:]

    def _loc(self, path) -> Location:
        return self.root.join(self._rel(path))

    def open(self, rel: str):
        """The shard file `rel`, opened once (pyarrow's ReadAt is thread-safe)."""
        with self._lock:
            if rel not in self.files:
                loc = self.root.join(rel)
                self.files[rel] = storage.retrying("open", loc, lambda: loc.fs.open_input_file(loc.path))
            return self.files[rel]

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    @contextmanager
    def create_stream(self, path, mode: str):
        if mode != "rb":
            raise NotImplementedError("checkpoints in a bucket are written by Ray Train, not through DCP here")
        loc = self._loc(path)
        if loc.name.endswith(".metadata"):
            yield io.BytesIO(loc.read_bytes())
        else:
            yield self.open(self._rel(path))

    def concat_path(self, path, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def init_path(self, path) -> str:
        return str(path)

    def rename(self, path, new_path) -> None:
        raise NotImplementedError

    def mkdir(self, path) -> None:
        raise NotImplementedError

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False  # chosen explicitly (dcp_load), never by guessing from an id

    def exists(self, path) -> bool:
        return self._loc(path).exists()

    def rm_file(self, path) -> None:
        raise NotImplementedError


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` allowing only what DCP writes there (its metadata dataclasses
    and enums, `_StorageInfo`, torch dtypes, sizes and layouts, paths). DCP's own reader
    unpickles it with plain `pickle.load`, which runs any code a poisoned file asks for."""

    ALLOWED = {("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
        ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        # Exact names only: pickle resolves a dotted name attribute by attribute, so a module that
        # is allowed would otherwise hand out everything it imports (`...metadata` + "os.system").
        allowed = "." not in name and ((module, name) in self.ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format))))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not something DCP writes into .metadata; refusing to "
                                         "load it (a poisoned or foreign checkpoint)")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP's file-system reader with `.metadata` read by `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


READ_THREADS = 16
"""Ranged GETs a RemoteReader keeps in flight."""


class RemoteReader(SafeReader):
    """DCP's reader for a checkpoint in a bucket. Each item this rank's load plan needs is one
    ranged GET of its bytes, retried on transient errors. Nothing else of the shard files is read.
    Up to `threads` GETs run ahead of DCP's (sequential) decoding, with at most `ahead_bytes` in
    flight: at an object store's ~20-50 ms per request, one at a time would dominate the load.
    `bytes_read` counts the bytes, `requests` the GETs."""

    def __init__(self, loc: Location, threads: int = READ_THREADS, ahead_bytes: int = 256 << 20):
        super().__init__(loc.path)
        self.fs = _ArrowFileSystem(loc)
        self.path = loc.path  # as pyarrow spells it (the base class made a pathlib.Path of it)
        self.loc = loc
        self.threads, self.ahead_bytes = max(1, threads), ahead_bytes
        self.bytes_read = self.requests = 0
        self._todo: deque[tuple[str, int, int]] = deque()
        self._ahead: dict[tuple[str, int, int], Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def _fetch(self, key: tuple[str, int, int]) -> bytes:
        rel, offset, length = key
        f = self.fs.open(rel)
        return storage.retrying("read checkpoint", self.loc.join(rel), lambda: f.read_at(length, offset))

    def _top_up(self) -> None:
        flying = sum(k[2] for k in self._ahead)
        while self._todo and len(self._ahead) < 2 * self.threads and (not self._ahead or flying < self.ahead_bytes):
            key = self._todo.popleft()
            if key not in self._ahead:
                self._ahead[key] = self._pool.submit(self._fetch, key)
                flying += key[2]

    def read_data(self, plan, planner):
        # The items in plan order, which is the order DCP's loop asks for them (another order would
        # still be correct: a key not fetched ahead is read when it is asked for).
        by_file: dict[str, list] = {}
        for item in plan.items:
            md = self.storage_data[item.storage_index]
            by_file.setdefault(md.relative_path, []).append((md.relative_path, md.offset, md.length))
        self._todo = deque(k for keys in by_file.values() for k in keys)
        pool = self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="raymoe-ckpt-read")
        try:
            self._top_up()
            return super().read_data(plan, planner)
        finally:
            # On an error, reads may still be running: let them end before their files close.
            pool.shutdown(wait=True, cancel_futures=True)
            self._ahead.clear()
            self._pool = None
            self.fs.close()

    def _slice_file(self, file, sinfo):
        key = (sinfo.relative_path, sinfo.offset, sinfo.length)
        fut = self._ahead.pop(key, None)
        data = fut.result() if fut is not None else self._fetch(key)
        self._top_up()
        self.bytes_read += len(data)
        self.requests += 1
        return io.BytesIO(data)


def dcp_load(state: dict, path: Path | Location, no_dist: bool) -> RemoteReader | None:
    """DCP load of `state` from a checkpoint directory: files on disk, ranged reads from a bucket
    (the reader is returned, for its byte count)."""
    remote = None if isinstance(path, Path) else RemoteReader(path, threads=READ_THREADS)  # its value now (jobs.bench storage sets it)
    # NOTE: DCP's CheckpointException derives from BaseException and carries each rank's traceback.
    try:
        dcp.load(state, storage_reader=remote or SafeReader(str(path)), no_dist=no_dist)
        return remote
    except (Exception, CheckpointException) as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} could not be read ({last}); it may be truncated or "
                              "from another program. It was left untouched") from e


def list_checkpoints(run_dir: str | Path | Location) -> list[Path | Location]:
    """Checkpoint directories of a run, newest step first."""
    run = storage.locate(run_dir)
    infos = storage.retrying("list", run, lambda: run.fs.get_file_info(
        storage.pafs.FileSelector(run.path, allow_not_found=True)))
    found = [run.join(i.base_name) for i in infos
             if i.type == storage.pafs.FileType.Directory and i.base_name.startswith(PREFIX)]
    return [storage.native(p) for p in sorted(found, key=lambda p: p.name, reverse=True)]


def latest_complete(run_dir: str | Path | Location, contents: bool = True) -> Path | Location | None:
    """The newest intact checkpoint of `run_dir` (every file at its size; with `contents`, and
    its checksum: this process reads the whole checkpoint), or None."""
    for p in list_checkpoints(run_dir):
        try:
            verify(p, contents=contents)
            return p
        except CheckpointError as e:
            print(f"[raymoe] WARNING: {e}; skipping it (left in place for inspection)", flush=True)
    return None
