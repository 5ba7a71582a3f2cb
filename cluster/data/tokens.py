"""Token datasets on disk and the deterministic order in which workers read them.

A dataset is a directory, local or under a `pyarrow.fs` URI (`s3://bucket/prefix`; see
cluster/data/storage.py):

    meta.json                 DatasetMeta as JSON
    train-00000.parquet ...   one column `tokens`: fixed_size_list<int32>[seq_len + 1]
    val-00000.parquet ...
    tokenizer.json            only for the BPE and json tokenizers (json: + tokenizer_config.json)

Each row is one training sequence: input = row[:-1], target = row[1:]. The Parquet footer of
every shard repeats `tokenizer`, `vocab_size`, `seq_len`, `eos_id`, so a lone shard explains
itself.

The training loop's data position is a single global sample index (`step * global_batch`).
`GlobalOrder` maps it to dataset rows independently of the number of workers, and
`batch_indices` cuts each global batch into per-rank parts, so a run resumed on a different
world size reads exactly the samples it would have read.

Shape letters: N rows, B rows of one batch, W = seq_len + 1 tokens per row.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.data import storage
from cluster.data.storage import Location

SPLITS = ("train", "val")


@dataclass
class Shard:
    file: str
    """File name inside the dataset directory, e.g. `train-00000.parquet`."""
    rows: int
    """Number of sequences in the file."""


@dataclass
class DatasetMeta:
    tokenizer: str
    """Tokenizer name: `byte`, `bpe` or `json` (then `tokenizer.json` sits beside the shards)."""
    vocab_size: int
    """Number of token ids, eos included."""
    eos_id: int
    """Token that ends every document in the stream."""
    seq_len: int
    """Model context length; every row holds seq_len + 1 tokens."""
    num_train: int
    """Rows in the train split."""
    num_val: int
    """Rows in the val split."""
    shards: dict[str, list[Shard]]
    """Shard files with row counts, per split, in file order."""
    source: str = ""
    """Where the text came from, for humans."""
    num_documents: int = 0
    """Non-empty documents tokenized."""
    num_characters: int = 0
    """Characters in those documents."""
    num_tokens: int = 0
    """Tokens in the stream (eos included) before the tail was dropped."""
    seed: int = 0
    """Seed of the window shuffle and train/val split."""
    num_bad_records: int = 0
    """Records that could not be read (none of them is in the shards); see bad_records."""
    bad_records: dict = dataclasses.field(default_factory=dict)
    """Bad records: `counts` by kind and the `first` few with file and line or row."""
    sources: list = dataclasses.field(default_factory=list)
    """Per --source: weight, files, documents, tokens, and the tokens the mixture kept."""

    def rows_per_shard(self, split: str) -> list[int]:
        return [s.rows for s in self.shards[split]]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: dict) -> DatasetMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown keys in meta.json: {unknown}")
        shards = {split: [Shard(**s) for s in raw.get("shards", {}).get(split, [])]
                  for split in SPLITS}
        return cls(**{**raw, "shards": shards})


def footer_metadata(meta: DatasetMeta) -> dict[bytes, bytes]:
    return {key.encode(): str(getattr(meta, key)).encode()
            for key in ("tokenizer", "vocab_size", "seq_len", "eos_id")}


# ---------------------------------------------------------------------------- writing


def write_dataset(docs: Iterable[str], out_dir: str | Path | Location, tokenizer, seq_len: int,
                  val_fraction: float = 0.05, rows_per_shard: int = 4096, seed: int = 0,
                  source: str = "", overwrite: bool = False) -> DatasetMeta:
    """Tokenize `docs` into a dataset directory at `out_dir` and return its metadata.

    Each document is followed by eos; the stream is cut into non-overlapping windows of
    seq_len + 1 tokens (the tail shorter than a window is dropped), the windows are shuffled
    with `seed`, and the first round(val_fraction * n) of them (at least 1) form the val split.

    Everything is written into a staging directory and published at the end
    (`storage.publish_dir`: a rename locally, temporary prefix + meta.json last on an object
    store), so `out_dir` is either absent or complete. NOTE: the whole token stream is held in
    memory, which suits the offline corpora of a few hundred MB at most that this is for.
    """
    out = storage.locate(out_dir)
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard={rows_per_shard} must be >= 1")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    check_out_dir(out, overwrite)

    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    parts, num_docs, num_chars = [], 0, 0
    for doc in docs:
        if not doc:
            continue  # an empty document would only add a second eos
        parts += [np.asarray(tokenizer.encode(doc), dtype=np.int32), eos]
        num_docs += 1
        num_chars += len(doc)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    width = seq_len + 1
    num_rows = len(stream) // width
    if num_rows < 2:
        raise ValueError(
            f"corpus too small: {num_docs} documents, {num_chars} characters, {len(stream)} "
            f"tokens make {num_rows} sequences of seq_len + 1 = {width} tokens (seq_len="
            f"{seq_len}); need at least 2 (one train, one val): lower seq_len or add text")
    windows = stream[: num_rows * width].reshape(num_rows, width)
    windows = windows[np.random.default_rng(seed).permutation(num_rows)]
    num_val = min(max(1, round(num_rows * val_fraction)), num_rows - 1)

    meta = DatasetMeta(
        tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
        seq_len=seq_len, num_train=num_rows - num_val, num_val=num_val, shards={},
        source=source, num_documents=num_docs, num_characters=num_chars,
        num_tokens=len(stream), seed=seed)

    tmp = storage.local_staging_dir(out)
    try:
        split_rows = {"train": windows[num_val:], "val": windows[:num_val]}
        for split in SPLITS:
            meta.shards[split] = _write_split(tmp, split, split_rows[split], rows_per_shard, meta)
        if hasattr(tokenizer, "save"):
            tokenizer.save(tmp / "tokenizer.json")
        # meta.json last: a directory with meta.json has all its shards.
        (tmp / "meta.json").write_text(meta.to_json())
        storage.publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write_split(directory: Path, split: str, rows_NW: np.ndarray, rows_per_shard: int,
                 meta: DatasetMeta) -> list[Shard]:
    """Write rows [N, W] into shards of at most `rows_per_shard` rows."""
    shards = []
    for i, start in enumerate(range(0, len(rows_NW), rows_per_shard)):
        name = f"{split}-{i:05d}.parquet"
        shards.append(write_shard(directory / name, rows_NW[start: start + rows_per_shard],
                                  footer_metadata(meta)))
    return shards


def write_shard(path: Path, rows_NW: np.ndarray, footer: dict[bytes, bytes]) -> Shard:
    """One shard file: rows int32 [N, W] as column `tokens`, `footer` in the file metadata."""
    chunk = np.ascontiguousarray(rows_NW, dtype=np.int32)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), chunk.shape[1])
    table = pa.table({"tokens": tokens}).replace_schema_metadata(footer)
    pq.write_table(table, path)
    return Shard(file=path.name, rows=len(chunk))


def check_out_dir(out_dir: str | Path | Location, overwrite: bool) -> None:
    """Raise FileExistsError if `out_dir` holds something and `overwrite` is off."""
    storage.check_absent(out_dir, overwrite)


def publish(tmp: Path, out_dir: str | Path | Location, overwrite: bool) -> None:
    """Publish the complete local directory `tmp` at `out_dir` (a path or a URI), atomically for
    readers: a rename locally, temporary prefix + meta.json last in a bucket (storage.publish_dir)."""
    storage.publish_dir(Path(tmp), out_dir, overwrite)


_publish = publish  # the name other writers (samples.py) import


# ---------------------------------------------------------------------------- reading


VERIFY = ("footers", "listing", "none")
"""How much of a dataset `read_meta` checks against meta.json:
- `footers`: also every shard's Parquet footer (row count, tokenizer fields), read by a thread pool.
  The driver does this once before it starts the workers.
- `listing`: the shard files present (one listing) and the row counts of meta.json. Each worker
  does only this, and checks each shard's rows and footer when it reads the shard
  (`read_shard(..., expect=)`). Checking every footer on every worker would cost
  workers x shards requests before the first step: 64 workers x 10,000 shards is 640,000 GETs,
  minutes at object-store latency.
- `none`: meta.json alone (a run keeps a copy for its tokenizer)."""

FOOTER_THREADS = 16
"""Concurrent footer reads: object stores answer each in tens of ms, so reading them one at a time
would take most of the check's time."""


def read_meta(path: str | Path | Location, verify: str = "footers", threads: int = FOOTER_THREADS) -> DatasetMeta:
    """Read meta.json and check it against the shard files, as far as `verify` says (VERIFY)."""
    if verify not in VERIFY:
        raise ValueError(f"verify={verify!r} must be one of {VERIFY}")
    root = storage.locate(path)
    info = root.info()
    if info.type == storage.pafs.FileType.NotFound:
        raise FileNotFoundError(f"data path '{root.uri}' does not exist; run `python -m "
                                f"jobs.prepare_data --out {root.uri}` or set data.path")
    if info.type != storage.pafs.FileType.Directory:
        raise NotADirectoryError(f"data path '{root.uri}' is not a directory")
    if verify == "none":
        listing = {"meta.json"} if root.join("meta.json").is_file() else set()
    else:
        listing = {loc.name for loc in root.children()}
    if "meta.json" not in listing:
        what = "is empty" if not listing and verify != "none" else "has no meta.json"
        raise FileNotFoundError(f"data path '{root.uri}' {what}: not a dataset; run `python -m "
                                f"jobs.prepare_data --out {root.uri}` or set data.path")
    try:
        meta = DatasetMeta.from_dict(json.loads(root.join("meta.json").read_text()))
    except (ValueError, TypeError) as err:
        raise ValueError(f"data path '{root.uri}': malformed meta.json: {err}") from err
    if verify == "none":
        return meta

    for split in SPLITS:
        shards = meta.shards[split]
        if not shards:
            raise ValueError(f"data path '{root.uri}': meta.json lists no {split} shards")
        total = sum(s.rows for s in shards)
        if total != getattr(meta, f"num_{split}"):
            raise ValueError(f"data path '{root.uri}': {split} shards hold {total} rows but "
                             f"meta.json says num_{split}={getattr(meta, f'num_{split}')}")
        present = sorted(n for n in listing if n.startswith(f"{split}-") and n.endswith(".parquet"))
        if present != sorted(s.file for s in shards):
            missing = sorted(set(s.file for s in shards) - set(present))
            extra = sorted(set(present) - set(s.file for s in shards))
            raise ValueError(f"data path '{root.uri}': the {split} shard files present differ from meta.json's "
                             f"{len(shards)}" + (f"; missing: {_some([root.join(m).uri for m in missing])}" if missing
                                                 else "")
                             + (f"; not in meta.json: {_some(extra)}" if extra else "") + ": prepare the dataset again")
    if verify == "footers":
        check_footers(root, meta, threads)
    return meta


def _some(names: list[str], at_most: int = 5) -> str:
    """The first few of a list of names, and how many more (10,000 shards make a long message)."""
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def check_footers(root: Location, meta: DatasetMeta, threads: int = FOOTER_THREADS) -> None:
    """Every shard's footer against meta.json (row count, tokenizer fields): footers only, a few KB
    each, `threads` at a time, with a progress line every 10 s. Raises on the first bad shard in
    file order. pyarrow spends 2 requests on each footer (a stat and a ranged GET)."""
    shards = [s for split in SPLITS for s in meta.shards[split]]
    expected = footer_metadata(meta)

    def check(shard: Shard) -> None:
        loc = root.join(shard.file)
        footer = storage.retrying("read footer of", loc, lambda: _read_footer(loc))
        _check_shard(loc, footer.num_rows, footer.metadata, shard, expected)

    t0 = last = time.monotonic()
    pool = ThreadPoolExecutor(max(1, min(threads, len(shards))), thread_name_prefix="raymoe-footers")
    try:
        for done, _ in enumerate(pool.map(check, shards), 1):
            if time.monotonic() - last > 10:
                last = time.monotonic()
                print(f"[data] checked {done}/{len(shards)} shard footers of {root.uri} "
                      f"({last - t0:.0f} s)", file=sys.stderr, flush=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a bad shard, the rest are not read


def _check_shard(loc: Location, rows: int, metadata: dict | None, shard: Shard,
                 expected: dict[bytes, bytes]) -> None:
    found = {k: v for k, v in (metadata or {}).items() if k in expected}
    if rows != shard.rows or found != expected:
        raise ValueError(f"shard {loc.uri} has {rows} rows and footer {found}, but meta.json says {shard.rows} "
                         f"rows and {expected}: the dataset was changed after it was written; prepare it again")


def _read_footer(loc: Location) -> pq.FileMetaData:
    with loc.fs.open_input_file(loc.path) as f:
        return pq.read_metadata(f)


@dataclass
class ReadStats:
    """Shard reads of one dataset, for the loop's metrics (`data_stalls`, `data_wait_s`)."""
    shard_reads: int = 0
    stalls: int = 0
    """Shards the loop had to wait for: not decoded yet, and no finished prefetch."""
    wait_s: float = 0.0
    """Seconds the loop spent waiting for shards."""


def read_shard(loc: Location, width: int, policy: storage.RetryPolicy | None = None,
               expect: tuple[Shard, dict[bytes, bytes]] | None = None) -> np.ndarray:
    """A token shard decoded into int32 [rows, width]; one GET of the whole object, retried on
    transient errors (a stalled read times out and is retried). With `expect` (the shard's entry
    in meta.json and footer_metadata(meta)), its row count and footer are checked against them."""
    try:
        data = storage.retrying("read shard", loc, lambda: _read_object(loc), policy)
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {loc.uri} is missing (it is listed in meta.json); the dataset "
                                "was changed after it was written: prepare it again") from None
    table = pq.read_table(pa.BufferReader(data), columns=["tokens"])
    if expect is not None:
        _check_shard(loc, table.num_rows, table.schema.metadata, *expect)
    column = table.column("tokens").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), width)


def _read_object(loc: Location) -> pa.Buffer:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read_buffer()


class TokenDataset:
    """One split of a dataset, read lazily: `get(indices)` -> int64 [n, seq_len + 1].

    Decoded shards are kept in a small LRU cache: `GlobalOrder` visits one shard at a time, so
    consecutive batches hit the same shard and no file is read twice in a row. With `prefetch`,
    `prefetch(i)` reads shard i in a background thread while the current one trains
    (`ShardedBatches` asks for the next shard of the order after every step).
    """

    def __init__(self, path: str | Path | Location, split: str = "train", cache_shards: int = 2,
                 prefetch: bool = False, timeout_s: float | None = None, attempts: int | None = None,
                 meta: DatasetMeta | None = None, verify: str = "listing") -> None:
        """`meta`: the dataset's, already read and checked (then nothing is read here); else it is
        read with `verify` (VERIFY). Either way each shard's rows and footer are checked as it is read."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        self.root = storage.locate(path, timeout_s=timeout_s)
        self.path = self.root.uri
        self.split = split
        self.meta = meta if meta is not None else read_meta(self.root, verify)
        self._footer = footer_metadata(self.meta)
        self.rows_per_shard = self.meta.rows_per_shard(split)
        self._offsets = np.cumsum([0] + self.rows_per_shard)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_shards = max(1, cache_shards)
        self.stats = ReadStats()
        self._policy = storage.RetryPolicy(attempts=attempts) if attempts else None
        # One thread: reads are sequential in the order anyway, and a second would only
        # compete with the training step for memory bandwidth.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="raymoe-prefetch") if prefetch else None
        self._pending: dict[int, Future] = {}

    @property
    def seq_len(self) -> int:
        return self.meta.seq_len

    @property
    def vocab_size(self) -> int:
        return self.meta.vocab_size

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def shard_of_row(self, row: int) -> int:
        return int(np.searchsorted(self._offsets, row, side="right") - 1)

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Rows at `indices` (int [n], into the concatenated shards) as int64 [n, seq_len + 1]."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"{self.split} row index out of range [0, {len(self)}): "
                             f"{indices.min()}..{indices.max()}")
        out_NW = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        shard_of = np.searchsorted(self._offsets, indices, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out_NW[mask] = self._shard(int(shard))[indices[mask] - self._offsets[shard]]
        return out_NW

    def prefetch(self, i: int) -> None:
        """Start reading shard i in the background (no-op without prefetch, or if it is cached
        or already on its way)."""
        if self._pool is None or i in self._cache or i in self._pending:
            return
        self._pending[i] = self._pool.submit(self._read, i)

    def _shard_location(self, i: int) -> Location:
        return self.root.join(self.meta.shards[self.split][i].file)

    def _read(self, i: int) -> np.ndarray:
        return read_shard(self._shard_location(i), self.seq_len + 1, self._policy,
                          expect=(self.meta.shards[self.split][i], self._footer))

    def _shard(self, i: int) -> np.ndarray:
        """Shard i decoded once into int32 [rows, seq_len + 1]."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        t0 = time.perf_counter()
        pending = self._pending.pop(i, None)
        if pending is None or not pending.done():
            self.stats.stalls += 1
        # A failed prefetch raises here, in the loop, with the shard's URI.
        rows_NW = pending.result() if pending is not None else self._read(i)
        self.stats.wait_s += time.perf_counter() - t0
        self.stats.shard_reads += 1
        self._cache[i] = rows_NW
        if len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return rows_NW

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------- order


class GlobalOrder:
    """Global sample index g (0, 1, 2, ... across epochs) -> dataset row, for every world size.

    epoch = g // N, position = g % N. An epoch visits the shards in a permutation seeded by
    (seed, epoch) and the rows of each shard in a permutation seeded by (seed, epoch, shard).
    Shuffling in two levels keeps reads local (a batch touches one or two shards) while the
    windows themselves were already shuffled globally when the dataset was written.
    The order is a pure function of (rows per shard, seed, g): no RNG state to checkpoint.
    """

    def __init__(self, num_rows_per_shard: list[int], seed: int) -> None:
        self._rows = np.asarray(num_rows_per_shard, dtype=np.int64)
        if len(self._rows) == 0 or self._rows.min() < 1:
            raise ValueError(f"num_rows_per_shard={list(num_rows_per_shard)} must be a "
                             "non-empty list of positive row counts")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.seed = seed
        self.num_rows = int(self._rows.sum())
        self._offsets = np.cumsum(np.concatenate([[0], self._rows]))
        self._layouts: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def epoch_of(self, g: int) -> int:
        return g // self.num_rows

    def rows(self, start: int, count: int) -> np.ndarray:
        """Global row ids (into the concatenated shards) of samples start .. start+count-1,
        int64 [count]."""
        if start < 0 or count < 0:
            raise ValueError(f"start={start} and count={count} must be >= 0")
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, pos = divmod(start + done, self.num_rows)
            shard_order, shard_start = self._layout(epoch)
            k = int(np.searchsorted(shard_start, pos, side="right")) - 1
            shard = int(shard_order[k])
            within = pos - int(shard_start[k])
            n = min(count - done, int(self._rows[shard]) - within)
            perm = self._row_perm(epoch, shard)
            out[done: done + n] = self._offsets[shard] + perm[within: within + n]
            done += n
        return out

    def shard_after(self, g: int) -> int:
        """The shard the order visits after the one that holds sample g (the next epoch's
        first shard after an epoch's last): what to prefetch."""
        epoch, pos = divmod(g, self.num_rows)
        shard_order, shard_start = self._layout(epoch)
        k = int(np.searchsorted(shard_start, pos, side="right"))
        if k < len(shard_order):
            return int(shard_order[k])
        return int(self._layout(epoch + 1)[0][0])

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shards in visiting order, and the epoch position at which each one starts."""
        if epoch not in self._layouts:
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self._rows))
            starts = np.cumsum(np.concatenate([[0], self._rows[order]]))[:-1]
            self._layouts[epoch] = (order, starts)
            if len(self._layouts) > 2:  # an epoch boundary needs two
                self._layouts.popitem(last=False)
        return self._layouts[epoch]

    def _row_perm(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._perms:
            rng = np.random.default_rng((self.seed, epoch, shard))
            self._perms[key] = rng.permutation(int(self._rows[shard]))
            if len(self._perms) > 4:
                self._perms.popitem(last=False)
        return self._perms[key]


# ---------------------------------------------------------------------------- batching


def batch_indices(step_start: int, global_batch: int, rank: int,
                  world_size: int) -> tuple[int, int]:
    """(start, count) in global sample indices of `rank`'s contiguous part of the global batch
    that begins at `step_start`."""
    if global_batch % world_size:
        raise ValueError(f"global_batch_size={global_batch} is not divisible by the number of "
                         f"workers ({world_size})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size})")
    per_rank = global_batch // world_size
    return step_start + rank * per_rank, per_rank


def micro_batches(start: int, count: int, micro_batch_size: int) -> list[tuple[int, int]]:
    """Split [start, start+count) into (start, count) chunks of micro_batch_size; the last one
    may be shorter."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    return [(s, min(micro_batch_size, start + count - s))
            for s in range(start, start + count, micro_batch_size)]


class ShardedBatches:
    """This rank's micro-batches for each optimizer step.

    The loop keeps `sample_start = step * global_batch` as its data position; because the
    split into ranks happens after the global order, any world size reads the same samples.
    """

    def __init__(self, dataset: TokenDataset, order: GlobalOrder, global_batch: int,
                 micro_batch_size: int, rank: int, world_size: int) -> None:
        if order.num_rows != len(dataset):
            raise ValueError(f"order covers {order.num_rows} rows but the dataset has "
                             f"{len(dataset)}")
        batch_indices(0, global_batch, rank, world_size)  # fail now, not at the first step
        micro_batches(0, 0, micro_batch_size)
        self.dataset, self.order = dataset, order
        self.global_batch, self.micro_batch_size = global_batch, micro_batch_size
        self.rank, self.world_size = rank, world_size

    def rows_for_step(self, sample_start: int) -> np.ndarray:
        """Dataset rows this rank reads for the step, int64 [global_batch / world_size]."""
        start, count = batch_indices(sample_start, self.global_batch, self.rank,
                                     self.world_size)
        return self.order.rows(start, count)

    def batches_for_step(self, sample_start: int) -> list[np.ndarray]:
        """Micro-batches int64 [micro, seq_len + 1]. NOTE: the last may be shorter when
        micro_batch_size does not divide the per-rank batch: weight losses by rows."""
        batch_BW = self.dataset.get(self.rows_for_step(sample_start))
        if hasattr(self.dataset, "prefetch"):
            # NOTE: one shard ahead of the end of this rank's part of the step: enough when a
            # shard lasts more than a step; a step spanning several shards waits for the others.
            start, count = batch_indices(sample_start, self.global_batch, self.rank, self.world_size)
            self.dataset.prefetch(self.order.shard_after(start + count - 1))
        return [batch_BW[i: i + self.micro_batch_size]
                for i in range(0, len(batch_BW), self.micro_batch_size)]


def eval_batches(dataset_val: TokenDataset, num_sequences: int, micro_batch_size: int,
                 rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's share of the first `num_sequences` val rows (file order), as micro-batches
    int64 [<=micro, seq_len + 1]; possibly empty.

    Val rows were shuffled when written, so a prefix is a fair sample. Ranks get counts that
    differ by at most one, so reduce summed losses and token counts, not per-rank means.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size})")
    total = min(num_sequences, len(dataset_val))
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    count = base + (1 if rank < extra else 0)
    return [dataset_val.get(np.arange(s, s + c))
            for s, c in micro_batches(start, count, micro_batch_size)]
