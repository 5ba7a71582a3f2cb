"""Datasets of fixed-shape samples: forecasting windows, image-caption pairs.

The token datasets of `cluster.data` hold one int column; tasks beyond language modelling need
several typed fields per sample (a window and its targets; an image, a caption and a label). A
sample dataset is a directory like a token dataset:

    meta.json               SampleMeta as JSON: the task kind, each field's shape and dtype,
                            shards per split, and task information (normalisation, captions)
    train-00000.parquet     one column per field: fixed_size_list<dtype>[prod(shape)]
    val-00000.parquet

`SampleDataset.get(indices)` returns a numpy structured array (one record per sample, fields by
name), which slices by rows like the token arrays, so `GlobalOrder`, `ShardedBatches` and the
exact resume on another world size work unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.data import storage
from cluster.data.tokens import SPLITS, Shard, check_out_dir


@dataclass
class SampleMeta:
    kind: str
    """Task kind the samples are for: `forecast` or `image_text`."""
    fields: dict[str, dict]
    """Field name -> {"shape": [...], "dtype": "float32"|"int32"|...}, per sample."""
    num_train: int
    num_val: int
    shards: dict[str, list[Shard]]
    positions: int
    """Sequence positions one sample feeds the model (for tokens/s and FLOPs)."""
    source: str = ""
    seed: int = 0
    info: dict = field(default_factory=dict)
    """Task information: normalisation statistics, candidate captions, vocabulary, ..."""

    @property
    def dtype(self) -> np.dtype:
        return np.dtype([(name, np.dtype(f["dtype"]), tuple(f["shape"])) for name, f in self.fields.items()])

    def rows_per_shard(self, split: str) -> list[int]:
        return [s.rows for s in self.shards[split]]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: dict) -> SampleMeta:
        shards = {split: [Shard(**s) for s in raw.get("shards", {}).get(split, [])] for split in SPLITS}
        return cls(**{**raw, "shards": shards})


def write_samples(out_dir: str | Path, splits: dict[str, np.ndarray], kind: str, positions: int,
                  source: str = "", info: dict | None = None, seed: int = 0, rows_per_shard: int = 4096,
                  overwrite: bool = False) -> SampleMeta:
    """Write structured arrays (one per split, same dtype) as a sample dataset at `out_dir`.

    Written into a temporary directory and renamed into place, so `out_dir` is either absent or
    complete (meta.json is written last)."""
    out = storage.locate(out_dir)
    check_out_dir(out, overwrite)
    dtype = splits["train"].dtype
    for split in SPLITS:
        if split not in splits or len(splits[split]) == 0:
            raise ValueError(f"the {split} split is empty: give more data or change the split")
        if splits[split].dtype != dtype:
            raise ValueError(f"splits have different fields: {splits[split].dtype} vs {dtype}")
    fields = {name: {"shape": list(dtype[name].shape), "dtype": dtype[name].base.name} for name in dtype.names}
    tmp = storage.local_staging_dir(out)
    try:
        shards = {split: _write_split(tmp, split, splits[split], rows_per_shard) for split in SPLITS}
        meta = SampleMeta(kind=kind, fields=fields, num_train=len(splits["train"]), num_val=len(splits["val"]),
                          shards=shards, positions=positions, source=source, seed=seed, info=info or {})
        (tmp / "meta.json").write_text(meta.to_json())
        storage.publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write_split(directory: Path, split: str, rows: np.ndarray, rows_per_shard: int) -> list[Shard]:
    shards = []
    for i, start in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[start: start + rows_per_shard]
        columns = {}
        for name in rows.dtype.names:
            flat = np.ascontiguousarray(chunk[name]).reshape(len(chunk), -1)
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        name = f"{split}-{i:05d}.parquet"
        pq.write_table(pa.table(columns), directory / name)
        shards.append(Shard(file=name, rows=len(chunk)))
    return shards


def read_sample_meta(path: str | Path, kind: str) -> SampleMeta:
    """meta.json of a sample dataset for task `kind`, with errors that say how to make one."""
    root = storage.locate(path)
    hint = f"make it with `python -m jobs.prepare_data --task {kind} --out {root.uri}` or set data.path"
    if not root.join("meta.json").is_file():
        raise FileNotFoundError(f"data path '{root.uri}' has no meta.json: {hint}")
    raw = json.loads(root.join("meta.json").read_text())
    if raw.get("kind") != kind:
        found = raw.get("kind", "token (language modelling)")
        raise ValueError(f"data path '{path}' holds {found} data, but train.task needs {kind} data: {hint}")
    meta = SampleMeta.from_dict(raw)
    present = {loc.name for loc in root.children()}
    for split in SPLITS:
        missing = [root.join(s.file).uri for s in meta.shards[split] if s.file not in present]
        if missing or not meta.shards[split]:
            raise ValueError(f"data path '{path}': {split} shards missing ({missing or 'none listed'}): {hint}")
    return meta


class SampleDataset:
    """One split, read lazily: `get(indices)` -> structured array [n] with the meta's fields."""

    def __init__(self, path: str | Path, split: str, kind: str, cache_shards: int = 2) -> None:
        self.root, self.split = storage.locate(path), split
        self.path = self.root.uri
        self.meta = read_sample_meta(path, kind)
        self.dtype = self.meta.dtype
        self._offsets = np.cumsum([0] + self.meta.rows_per_shard(split))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_shards = cache_shards

    @property
    def seq_len(self) -> int:
        return self.meta.positions

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def get(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"{self.split} sample index out of range [0, {len(self)})")
        out = np.empty(len(indices), dtype=self.dtype)
        shard_of = np.searchsorted(self._offsets, indices, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = self._shard(int(shard))[indices[mask] - self._offsets[shard]]
        return out

    def all(self) -> np.ndarray:
        return self.get(np.arange(len(self)))

    def _shard(self, i: int) -> np.ndarray:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        loc = self.root.join(self.meta.shards[self.split][i].file)
        try:
            data = storage.retrying("read shard", loc, lambda: loc.read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {loc.uri} is missing (it is listed in meta.json): prepare the "
                                    "dataset again") from None
        table = pq.read_table(pa.BufferReader(data))
        rows = np.empty(table.num_rows, dtype=self.dtype)
        for name in self.dtype.names:
            values = table.column(name).combine_chunks().flatten().to_numpy()
            rows[name] = values.reshape((table.num_rows,) + self.dtype[name].shape)
        self._cache[i] = rows
        if len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return rows
