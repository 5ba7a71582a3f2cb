"""Corpus-scale data preparation on Ray Data: sources -> token shards + meta.json (tokens.py's format).

    files --map_batches(tokenize)--> one token file per input file (cached in <out>.work/)
          --map_batches(mix)-------> kept documents per file, when the sources are weighted
          --map_batches(write)-----> train-*/val-*.parquet, each shard written by one task
          -> meta.json, published atomically with the shards (tokens.publish)

Determinism. Every input file is tokenized on its own, records in file order, so its token file
depends only on the file, the tokenizer and the options. The token stream is those files
concatenated in key order (source, file), so it does not depend on which task finished first;
windows are stream[i * W: (i + 1) * W] for W = seq_len + 1, and window i lands at the output
position given by `window_order` (a keyed bijection of [0, n) computed from n and the seed).
Each writer task derives its rows from (n, seed, its position range) alone: no step collects
windows, and shards are byte-identical whatever the number of CPUs, nodes or the run.

Memory. A tokenize task holds one chunk of text (CHUNK_BYTES) and its tokens; a writer task
one shard; the driver only per-file counts. Nothing grows with the corpus except the number of
files listed. NOTE: a .txt/.md file is one document and is read whole.

Resume. A file's tokens are written to `<out>.work/tok/<key>.*` and renamed into place when
complete, its counts (`.json`) last; `key` hashes the file's path, size and mtime, the format
options and the tokenizer. A re-run after a crash tokenizes only the files without a `.json`.
The work directory is removed once the dataset is published; a failed run (too many bad
records, say) keeps it, so raising --max-bad-fraction re-uses every file.

Bad records (corpus.BadRecord) are counted per kind, the first few located by file and line;
more than max_bad_fraction of all records fails the job before anything is published.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cluster.data.corpus import BadRecord, Source, SourceFile, discover, iter_records
from cluster.data.tokenizer import BPETokenizer, ByteTokenizer, JSONTokenizer
from cluster.data.tokens import DatasetMeta, Shard, check_out_dir, footer_metadata, publish, write_shard

CHUNK_BYTES = 1 << 20  # text encoded per tokenizer call in a task: bounds a task's memory
FIRST_BAD = 10  # bad records reported with their place, in the summary and meta.json
CACHE_VERSION = 1  # bump when the token-file layout changes: old work dirs are then ignored
DTYPE = np.dtype("<i4")


@dataclass
class CorpusOptions:
    sources: list[str]
    """`PATH[:WEIGHT]` each (see corpus.discover)."""
    out: str
    tokenizer: str = "byte"
    """byte, bpe (trained here on a sample), or a tokenizer.json / directory holding one."""
    vocab_size: int = 4096
    seq_len: int = 256
    val_fraction: float = 0.05
    seed: int = 0
    text_field: str = "text"
    max_bad_fraction: float = 0.001
    rows_per_shard: int = 4096
    num_cpus: int | None = None
    """Concurrent tasks per stage (None: as many as the cluster gives)."""
    bpe_sample_mb: float = 256.0
    """Text the BPE tokenizer is trained on (spread over the sources, in key order)."""
    overwrite: bool = False
    isolate_workers: bool = True
    """Run the tasks in worker processes of their own (a per-run runtime env), so the peak
    memory reported is this job's alone; off: the cluster's pooled workers (no start-up wait)."""

    def check(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len} must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if self.rows_per_shard < 1 or self.seed < 0:
            raise ValueError(f"rows_per_shard={self.rows_per_shard} must be >= 1 and seed={self.seed} >= 0")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus={self.num_cpus} must be >= 1")


class BadRecordsError(ValueError):
    """More bad records than max_bad_fraction allows; nothing was published."""


# ---------------------------------------------------------------------------- window order


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a cheap, well-mixed hash of uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def window_order(n: int, seed: int, positions: np.ndarray) -> np.ndarray:
    """Window id at each output position (int64): a bijection of [0, n) keyed by (n, seed).

    A 4-round Feistel network permutes [0, 4^h) for the smallest 4^h >= n, and ids past n are
    walked on through it (cycle walking) until they fall inside; any slice of positions is
    computed on its own in O(len) memory, which a materialised permutation of n would not be.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.default_rng([seed, n]).integers(0, 2**63, size=4, dtype=np.uint64)

    def permute(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
        return (left << np.uint64(half)) | right

    with np.errstate(over="ignore"):
        ids = permute(np.asarray(positions, dtype=np.uint64))
        outside = ids >= np.uint64(n)
        while outside.any():
            ids[outside] = permute(ids[outside])
            outside = ids >= np.uint64(n)
    return ids.astype(np.int64)


def num_val_rows(num_rows: int, val_fraction: float) -> int:
    """As write_dataset: round(val_fraction * n), at least 1 and leaving at least 1 for train."""
    return min(max(1, round(num_rows * val_fraction)), num_rows - 1)


# ---------------------------------------------------------------------------- tokenizer


def build_tokenizer(opts: CorpusOptions, sources: list[Source], work: Path):
    """The tokenizer, saved in `work` for the tasks (none for bytes); a BPE trained by an
    earlier run on the same inputs is reused, so its token files stay valid."""
    if opts.tokenizer == "byte":
        return ByteTokenizer()
    work.mkdir(parents=True, exist_ok=True)
    file = work / "tokenizer.json"
    if opts.tokenizer == "bpe":
        key = _hash([[(f.path, f.size) for f in s.files] for s in sources], opts.vocab_size,
                    opts.bpe_sample_mb, opts.text_field)
        if file.is_file() and (work / "tokenizer.key").is_file() and (work / "tokenizer.key").read_text() == key:
            return BPETokenizer.load(file)
        tok = BPETokenizer.train(_sample_texts(sources, opts.text_field, opts.bpe_sample_mb * 1e6),
                                 opts.vocab_size)
        tok.save(file)
        (work / "tokenizer.key").write_text(key)
        return tok
    tok = JSONTokenizer.from_path(opts.tokenizer)
    tok.save(file)  # with its conventions, so every task frames documents alike
    return tok


def _sample_texts(sources: list[Source], text_field: str, limit: float):
    """The first limit / len(sources) bytes of text of each source, in key order."""
    per_source = limit / len(sources)
    for src in sources:
        taken = 0
        for file in src.files:
            for rec in iter_records(file, text_field):
                if isinstance(rec, BadRecord) or not rec[1]:
                    continue
                yield rec[1]
                taken += len(rec[1])
                if taken >= per_source:
                    break
            if taken >= per_source:
                break


def _tokenizer_spec(tok, work: Path) -> dict:
    if isinstance(tok, ByteTokenizer):
        return {"kind": "byte", "fingerprint": "byte"}
    files = sorted(work.glob("tokenizer*.json"))
    return {"kind": tok.name, "path": str(work / "tokenizer.json"),
            "fingerprint": _hash(*[f.read_bytes().hex() for f in files])}


_TOKENIZERS: dict[str, object] = {}


def _worker_tokenizer(spec: dict):
    """Loaded once per worker process."""
    key = spec["fingerprint"]
    if key not in _TOKENIZERS:
        if spec["kind"] == "byte":
            _TOKENIZERS[key] = ByteTokenizer()
        elif spec["kind"] == "bpe":
            _TOKENIZERS[key] = BPETokenizer.load(spec["path"])
        else:
            _TOKENIZERS[key] = JSONTokenizer.from_path(spec["path"])
    return _TOKENIZERS[key]


def encode_documents(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Documents framed as [bos] tokens eos, concatenated: (int32 stream, tokens per document)."""
    if isinstance(tok, ByteTokenizer):
        arrays = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    else:
        arrays = [np.asarray(ids, dtype=np.int32) for ids in tok.encode_batch(texts)]
    eos = np.array([tok.eos_id], dtype=np.int32)
    bos = getattr(tok, "bos_id", None)
    head = [np.array([bos], dtype=np.int32)] if bos is not None else []
    pieces = [p for a in arrays for p in (*head, a, eos)]
    stream = np.concatenate(pieces, dtype=np.int32, casting="safe") if pieces else np.zeros(0, np.int32)
    lengths = np.array([len(a) + 1 + len(head) for a in arrays], dtype=np.int64)
    return stream, lengths


# ---------------------------------------------------------------------------- stage 1: tokenize


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def file_key(file: SourceFile, text_field: str, tok_fingerprint: str) -> str:
    stamp = [file.path, sys.version.split()[0]] if file.format == "pydoc" else \
        [file.path, file.size, os.stat(file.path).st_mtime_ns]
    return _hash(CACHE_VERSION, stamp, file.format, text_field if file.format in ("jsonl", "parquet") else "",
                 tok_fingerprint)


def _peak_rss_kb() -> int:
    """This process's peak resident memory (VmHWM), kB; 0 where /proc has none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _report(**kw) -> dict:
    return {"report": [json.dumps({**kw, "pid": os.getpid(), "host": os.uname().nodename,
                                   "peak_kb": _peak_rss_kb()})]}


def _tokenize_batch(batch: dict, tok_spec: dict, text_field: str, work: str):
    """map_batches generator: tokenize each file of the batch; yield progress and summaries."""
    for unit in batch["unit"]:
        yield from _tokenize_file(json.loads(str(unit)), tok_spec, text_field, Path(work))


def _tokenize_file(unit: dict, tok_spec: dict, text_field: str, work: Path):
    file = SourceFile(**unit["file"])
    base = work / "tok" / unit["key"]
    done = base.with_suffix(".json")
    if done.is_file():
        summary = json.loads(done.read_text())
        yield _report(key=unit["key"], done=True, reused=True, summary=summary,
                      delta={**_counts(summary), "in_bytes": file.size})
        return
    # One task, one core: `tokenizers` reads this at each batch call (pooled workers have no
    # per-run env; RAYON_NUM_THREADS, set there, also caps a pool already started).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = _worker_tokenizer(tok_spec)
    base.parent.mkdir(parents=True, exist_ok=True)
    tmp_tok = Path(f"{base}.tok.tmp-{os.getpid()}")
    tmp_len = Path(f"{base}.len.tmp-{os.getpid()}")
    summary = {"docs": 0, "empty": 0, "chars": 0, "bytes": 0, "tokens": 0, "bad": {}, "first_bad": []}
    delta = dict.fromkeys(("docs", "bytes", "tokens", "bad", "in_bytes"), 0)
    texts, pending, position, last = [], 0, [0], time.monotonic()
    with open(tmp_tok, "wb") as out_tok, open(tmp_len, "wb") as out_len:
        def flush():
            nonlocal texts, pending
            if texts:
                stream, lengths = encode_documents(tok, texts)
                out_tok.write(stream.astype(DTYPE, copy=False).tobytes())
                chars = np.array([len(t) for t in texts], dtype=np.int64)
                out_len.write(np.stack([lengths, chars], axis=1).astype("<i8").tobytes())
                summary["tokens"] += len(stream)
                delta["tokens"] += len(stream)
            texts, pending = [], 0

        for rec in iter_records(file, text_field, position):
            if isinstance(rec, BadRecord):
                summary["bad"][rec.kind] = summary["bad"].get(rec.kind, 0) + rec.count
                delta["bad"] += rec.count
                if len(summary["first_bad"]) < FIRST_BAD:
                    summary["first_bad"].append(rec.to_dict())
                continue
            text = rec[1]
            if not text:
                summary["empty"] += 1  # an empty document would only add a second eos
                continue
            size = len(text.encode("utf-8"))
            texts.append(text)
            pending += size
            summary["docs"] += 1
            summary["chars"] += len(text)
            summary["bytes"] += size
            delta["docs"] += 1
            delta["bytes"] += size
            if pending >= CHUNK_BYTES:
                flush()
                if time.monotonic() - last > 1.0:
                    delta["in_bytes"] = position[0] - unit.get("reported", 0)
                    unit["reported"] = position[0]
                    yield _report(key=unit["key"], done=False, delta=delta)
                    delta = dict.fromkeys(delta, 0)
                    last = time.monotonic()
        flush()
    os.replace(tmp_tok, f"{base}.tok")
    os.replace(tmp_len, f"{base}.len")
    done.write_text(json.dumps(summary))  # last: a file with .json is complete
    delta["in_bytes"] = file.size - unit.get("reported", 0)
    yield _report(key=unit["key"], done=True, reused=False, summary=summary, delta=delta)


def _counts(summary: dict) -> dict:
    return {"docs": summary["docs"], "bytes": summary["bytes"], "tokens": summary["tokens"],
            "bad": sum(summary["bad"].values())}


# ---------------------------------------------------------------------------- stage 2: mixture


def _mix_batch(batch: dict, seed: int, work: str):
    for unit in batch["unit"]:
        yield _mix_file(json.loads(str(unit)), seed, Path(work))


def _mix_file(unit: dict, seed: int, work: Path) -> dict:
    """Keep each document of the file with probability `keep`, drawn from a generator seeded by
    (seed, source, file): the draws follow the file's document order, not the run."""
    src = work / "tok" / unit["key"]
    base = work / "mix" / f"{unit['key']}-{_hash(unit['keep'], seed)}"
    if not base.with_suffix(".json").is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, unit["source"], unit["index"]])
        counts = {"docs": 0, "chars": 0, "tokens": 0}
        tmp = Path(f"{base}.tok.tmp-{os.getpid()}")
        with open(f"{src}.len", "rb") as lens, open(f"{src}.tok", "rb") as toks, open(tmp, "wb") as out:
            while True:
                raw = lens.read(16 * 4096)  # 4096 documents' (tokens, characters)
                if not raw:
                    break
                len_D2 = np.frombuffer(raw, dtype="<i8").reshape(-1, 2)
                keep_D = rng.random(len(len_D2)) < unit["keep"]
                # Copy runs of kept documents and skip the others, CHUNK_BYTES at a time.
                edges = np.flatnonzero(np.diff(np.concatenate([[0], keep_D.astype(np.int8), [0]])))
                ends = np.cumsum(len_D2[:, 0])
                base_offset = toks.tell()
                for first, stop in zip(edges[::2], edges[1::2]):
                    lo = int(ends[first] - len_D2[first, 0]) * 4
                    toks.seek(base_offset + lo)
                    left = int(ends[stop - 1]) * 4 - lo
                    while left:
                        piece = toks.read(min(left, CHUNK_BYTES))
                        if not piece:
                            raise OSError(f"{src}.tok is shorter than its .len says: delete {work} and re-run")
                        out.write(piece)
                        left -= len(piece)
                toks.seek(base_offset + int(ends[-1]) * 4)
                counts["docs"] += int(keep_D.sum())
                counts["chars"] += int(len_D2[keep_D, 1].sum())
                counts["tokens"] += int(len_D2[keep_D, 0].sum())
        os.replace(tmp, f"{base}.tok")
        base.with_suffix(".json").write_text(json.dumps(counts))
    counts = json.loads(base.with_suffix(".json").read_text())
    return _report(key=unit["key"], stream=f"{base}.tok", **counts)


def mixture_keep(tokens_by_source: list[int], weights: list[float]) -> list[float]:
    """Probability of keeping a document of each source so that the sources' token shares match
    the weights: the scarcest source (relative to its weight) is kept whole, the others
    subsampled; nothing is repeated."""
    share = np.asarray(weights, dtype=np.float64) / sum(weights)
    tokens = np.asarray(tokens_by_source, dtype=np.float64)
    total = float(np.min(tokens / share))
    return [float(min(1.0, s * total / t)) for s, t in zip(share, tokens)]


# ---------------------------------------------------------------------------- stage 3: write


class TokenStream:
    """Read [offset, offset + count) of the concatenated token files with positioned reads (no
    mmap: mapped pages would count as the task's resident memory)."""

    def __init__(self, files: list[tuple[str, int]]) -> None:
        self.paths = [p for p, _ in files]
        self.starts = np.concatenate([[0], np.cumsum([n for _, n in files])]).astype(np.int64)
        self._fds: dict[int, int] = {}

    def read(self, offset: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=DTYPE)
        done = 0
        f = int(np.searchsorted(self.starts, offset, side="right")) - 1
        while done < count:
            within = offset + done - int(self.starts[f])
            n = min(count - done, int(self.starts[f + 1]) - (offset + done))
            if n > 0:
                if f not in self._fds:
                    self._fds[f] = os.open(self.paths[f], os.O_RDONLY)
                data = os.pread(self._fds[f], n * 4, within * 4)
                out[done: done + n] = np.frombuffer(data, dtype=DTYPE)
                done += n
            f += 1
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _write_batch(batch: dict, layout: dict, tmp: str):
    stream = TokenStream([tuple(f) for f in layout["files"]])
    try:
        for spec in batch["unit"]:
            spec = json.loads(str(spec))
            width = layout["seq_len"] + 1
            positions = np.arange(spec["start"], spec["start"] + spec["rows"], dtype=np.int64)
            ids = window_order(layout["num_rows"], layout["seed"], positions)
            rows_NW = np.empty((len(ids), width), dtype=np.int32)
            for r in np.argsort(ids, kind="stable"):  # in stream order: reads run forward
                rows_NW[r] = stream.read(int(ids[r]) * width, width)
            footer = {k.encode(): v.encode() for k, v in layout["footer"].items()}
            shard = write_shard(Path(tmp) / spec["file"], rows_NW, footer)
            yield _report(file=shard.file, rows=shard.rows)
    finally:
        stream.close()


# ---------------------------------------------------------------------------- driver


class Progress:
    """One line on stderr every `every` seconds: files, documents, MB, tokens, bad, ETA."""

    def __init__(self, total_bytes: int, total_files: int, print_fn: Callable[[str], None] | None,
                 every: float = 2.0) -> None:
        self.total_bytes, self.total_files = max(1, total_bytes), total_files
        self.print_fn, self.every = print_fn, every
        self.began = self.last = time.monotonic()
        self.files = 0
        self.counts = dict.fromkeys(("docs", "bytes", "tokens", "bad", "in_bytes"), 0)

    def add(self, delta: dict, file_done: bool) -> None:
        for k, v in delta.items():
            self.counts[k] += v
        self.files += file_done
        if self.print_fn and (time.monotonic() - self.last >= self.every or self.files == self.total_files):
            self.last = time.monotonic()
            self.print_fn(self.line())

    def line(self) -> str:
        c, elapsed = self.counts, time.monotonic() - self.began
        frac = min(1.0, c["in_bytes"] / self.total_bytes)
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        eta_s = "?" if eta != eta else time.strftime("%H:%M:%S", time.gmtime(eta))
        return (f"tokenize  files {self.files}/{self.total_files}  docs {c['docs']:,}  "
                f"text {c['bytes'] / 1e6:,.1f} MB  tokens {c['tokens'] / 1e6:,.2f} M  bad {c['bad']:,}  "
                f"{c['bytes'] / 1e6 / max(elapsed, 1e-9):.1f} MB/s  ETA {eta_s}")


def describe(sources: list[Source]) -> str:
    """What a run would read (--dry-run)."""
    lines = []
    for s in sources:
        formats = sorted({f.format for f in s.files})
        size = sum(f.size for f in s.files)
        lines.append(f"source {s.spec!r}: {len(s.files)} file(s), {size / 1e6:,.1f} MB on disk, "
                     f"{'/'.join(formats)}" + (f", weight {s.weight}" if s.weight is not None else ""))
        lines += [f"    {f.path}  ({f.size / 1e6:,.2f} MB)" for f in s.files[:5]]
        if len(s.files) > 5:
            lines.append(f"    ... and {len(s.files) - 5} more")
    return "\n".join(lines)


def _map(ds, fn, opts: CorpusOptions, run_env: dict | None, **fn_kwargs):
    import ray.data

    compute = ray.data.TaskPoolStrategy(size=opts.num_cpus) if opts.num_cpus else None
    extra = {"runtime_env": {"env_vars": run_env}} if run_env else {}
    return ds.map_batches(fn, batch_size=1, compute=compute, num_cpus=1, fn_kwargs=fn_kwargs, **extra)


def _warm_batch(batch: dict):
    time.sleep(0.5)  # long enough that the scheduler spreads these over distinct workers
    yield _report(warm=True)


def _items(units: list[dict]):
    import ray.data

    return ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=max(1, len(units)))


def prepare_corpus(opts: CorpusOptions, print_fn: Callable[[str], None] | None = None) -> tuple[DatasetMeta, dict]:
    """Prepare the dataset at `opts.out` on the connected Ray cluster (ray.init beforehand, or
    a local one is started); returns its metadata and the run's report (counts, peaks, times)."""
    import ray
    import ray.data

    from cluster.data import storage

    opts.check()
    dest = storage.locate(opts.out)  # a local path or a URI (s3://bucket/prefix)
    storage.check_absent(dest, opts.overwrite)  # before any work, not after
    # The work and staging directories are local: beside a local output (one rename publishes),
    # under the temporary directory for a bucket (published by upload, meta.json last).
    out = Path(dest.path) if dest.is_local else Path(tempfile.gettempdir()) / f"raymoe-prepare-{dest.name}"
    if dest.is_local:
        check_out_dir(out, opts.overwrite)
    sources = discover(opts.sources)
    work = out.with_name(f"{out.name}.work")
    tokenizer_began = time.monotonic()
    tok = build_tokenizer(opts, sources, work)  # a BPE is trained here, in the driver
    tokenizer_s = time.monotonic() - tokenizer_began
    spec = _tokenizer_spec(tok, work)
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Fresh worker processes for this run (their own runtime env), one core each for Rust
    # tokenizers: the peak memory reported is this job's, and a task is one CPU's work.
    run_env = {"RAYMOE_PREPARE_RUN": f"{os.getpid()}-{time.time_ns()}", "RAYON_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"} if opts.isolate_workers else None
    peaks: dict[tuple[str, int], int] = {}

    def note(rep: dict) -> dict:
        peaks[(rep["host"], rep["pid"])] = max(peaks.get((rep["host"], rep["pid"]), 0), rep["peak_kb"])
        return rep

    startup_began = time.monotonic()
    if run_env:
        # Start this run's workers first, so the times below are of the work, not of starting
        # processes (reported apart: seconds on a loaded machine).
        width = opts.num_cpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
        for row in _map(_items([{}] * width), _warm_batch, opts, run_env).iter_rows():
            note(json.loads(row["report"]))
    startup_s = time.monotonic() - startup_began
    began = time.monotonic()

    # Stage 1: tokenize every file (largest first, so the last task to finish is a short one).
    files = [f for s in sources for f in s.files]
    units = sorted(({"file": dataclasses.asdict(f), "key": file_key(f, opts.text_field, spec["fingerprint"])}
                    for f in files), key=lambda u: -u["file"]["size"])
    progress = Progress(sum(f.size for f in files), len(files), print_fn)
    summaries: dict[str, dict] = {}
    reused = 0
    stage = _map(_items(units), _tokenize_batch, opts, run_env, tok_spec=spec, text_field=opts.text_field,
                 work=str(work))
    for row in stage.iter_rows():
        rep = note(json.loads(row["report"]))
        if rep["done"] and rep["key"] in summaries:
            continue  # a retried task reporting a file twice
        progress.add(rep["delta"], rep["done"])
        if rep["done"]:
            summaries[rep["key"]] = rep["summary"]
            reused += rep["reused"]
    tokenize_s = time.monotonic() - began
    key_of = {(u["file"]["source"], u["file"]["index"]): u["key"] for u in units}
    ordered = [(f, summaries[key_of[(f.source, f.index)]]) for f in files]  # key order

    bad_counts: dict[str, int] = {}
    first_bad: list[dict] = []
    for _, s in ordered:
        for kind, n in s["bad"].items():
            bad_counts[kind] = bad_counts.get(kind, 0) + n
        first_bad += s["first_bad"][: FIRST_BAD - len(first_bad)]
    num_bad = sum(bad_counts.values())
    num_records = num_bad + sum(s["docs"] + s["empty"] for _, s in ordered)
    if num_records and num_bad / num_records > opts.max_bad_fraction:
        shown = "\n".join(f"  {BadRecord(**b).where()}: {b['kind']}: {b['detail']}" for b in first_bad)
        raise BadRecordsError(
            f"{num_bad:,} of {num_records:,} records are bad ({num_bad / num_records:.4%} > "
            f"--max-bad-fraction {opts.max_bad_fraction}): {bad_counts}; first ones:\n{shown}\n"
            f"nothing was published; fix the sources (or --text-field) or raise --max-bad-fraction: "
            f"the files tokenized so far are kept in {work} for the re-run")

    # Stage 2: the mixture (weighted sources only).
    per_source = []
    for i, s in enumerate(sources):
        mine = [sm for f, sm in ordered if f.source == i]
        per_source.append({"source": s.spec, "weight": s.weight, "files": len(s.files),
                           "documents": sum(m["docs"] for m in mine), "tokens": sum(m["tokens"] for m in mine),
                           "bad": sum(sum(m["bad"].values()) for m in mine)})
    for p in per_source:
        if p["tokens"] == 0:
            raise ValueError(f"--source {p['source']!r} has no text ({p['files']} file(s), "
                             f"{p['bad']} bad records)")
    streams = [(str(work / "tok" / f"{key_of[(f.source, f.index)]}.tok"), sm["tokens"], sm["docs"], sm["chars"])
               for f, sm in ordered]
    if sources[0].weight is not None:
        keep = mixture_keep([p["tokens"] for p in per_source], [s.weight for s in sources])
        mix_units = [{"key": key_of[(f.source, f.index)], "source": f.source, "index": f.index,
                      "keep": keep[f.source]} for f, _ in ordered]
        mixed = {}
        for row in _map(_items(mix_units), _mix_batch, opts, run_env, seed=opts.seed, work=str(work)).iter_rows():
            rep = note(json.loads(row["report"]))
            mixed[rep["key"]] = rep
        streams = [(mixed[u["key"]]["stream"], mixed[u["key"]]["tokens"], mixed[u["key"]]["docs"],
                    mixed[u["key"]]["chars"]) for u in mix_units]
        for p, k in zip(per_source, keep):
            p["keep"] = k
        for i, p in enumerate(per_source):
            p["kept_tokens"] = sum(mixed[u["key"]]["tokens"] for u in mix_units if u["source"] == i)

    # Stage 3: windows -> shards.
    width = opts.seq_len + 1
    num_tokens = sum(s[1] for s in streams)
    num_docs, num_chars = sum(s[2] for s in streams), sum(s[3] for s in streams)
    num_rows = num_tokens // width
    if num_rows < 2:
        raise ValueError(
            f"corpus too small: {num_docs} documents, {num_chars} characters, {num_tokens} tokens make "
            f"{num_rows} sequences of seq_len + 1 = {width} tokens (seq_len={opts.seq_len}); need at "
            "least 2 (one train, one val): lower seq_len or add text")
    num_val = num_val_rows(num_rows, opts.val_fraction)
    meta = DatasetMeta(
        tokenizer=tok.name, vocab_size=tok.vocab_size, eos_id=tok.eos_id, seq_len=opts.seq_len,
        num_train=num_rows - num_val, num_val=num_val, shards={"train": [], "val": []},
        source=", ".join(opts.sources), num_documents=num_docs, num_characters=num_chars,
        num_tokens=num_tokens, seed=opts.seed, num_bad_records=num_bad,
        bad_records={"counts": bad_counts, "first": first_bad}, sources=per_source)
    shard_specs = []
    for split, start, rows in (("val", 0, num_val), ("train", num_val, num_rows - num_val)):
        for i, s in enumerate(range(0, rows, opts.rows_per_shard)):
            spec_rows = min(opts.rows_per_shard, rows - s)
            shard_specs.append({"file": f"{split}-{i:05d}.parquet", "start": start + s, "rows": spec_rows})
            meta.shards[split].append(Shard(file=shard_specs[-1]["file"], rows=spec_rows))
    layout = {"files": [(p, n) for p, n, _, _ in streams if n], "seq_len": opts.seq_len, "num_rows": num_rows,
              "seed": opts.seed, "footer": {k.decode(): v.decode() for k, v in footer_metadata(meta).items()}}
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_began = time.monotonic()
    try:
        written = 0
        for row in _map(_items(shard_specs), _write_batch, opts, run_env, layout=layout, tmp=str(tmp)).iter_rows():
            note(json.loads(row["report"]))
            written += 1
            if print_fn and (written == len(shard_specs) or written % 16 == 0):
                print_fn(f"write     shards {written}/{len(shard_specs)}")
        if not isinstance(tok, ByteTokenizer):
            tok.save(tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(meta.to_json())  # last: a directory with meta.json is complete
        publish(tmp, dest, opts.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - began
    text_bytes = sum(s["bytes"] for _, s in ordered)
    driver_kb = _peak_rss_kb()
    report = {
        "files": len(files), "reused_files": reused, "documents": sum(s["docs"] for _, s in ordered),
        "empty_documents": sum(s["empty"] for _, s in ordered), "text_bytes": text_bytes,
        "input_bytes": sum(f.size for f in files), "tokens": sum(s["tokens"] for _, s in ordered),
        "bad_records": num_bad, "bad_counts": bad_counts, "first_bad": first_bad, "records": num_records,
        "sources": per_source, "rows": num_rows, "shards": len(shard_specs),
        "seconds": seconds, "startup_seconds": startup_s, "tokenizer_seconds": tokenizer_s,
        "tokenize_seconds": tokenize_s, "write_seconds": time.monotonic() - write_began,
        "text_mb_per_s": text_bytes / 1e6 / seconds,
        "tokens_per_s": sum(s["tokens"] for _, s in ordered) / seconds,
        "peak_mb": {"driver": driver_kb / 1024, "workers": sum(peaks.values()) / 1024,
                    "largest_worker": max(peaks.values(), default=0) / 1024,
                    "worker_processes": len(peaks), "total": (driver_kb + sum(peaks.values())) / 1024},
    }
    return meta, report


def summary_lines(meta: DatasetMeta, report: dict) -> list[str]:
    r = report
    lines = [f"source     {meta.source}",
             f"files      {r['files']:,} ({r['reused_files']:,} tokenized by an earlier run)   "
             f"records {r['records']:,}   bad {r['bad_records']:,} {r['bad_counts'] or ''}",
             f"documents  {r['documents']:,} read, {meta.num_documents:,} kept   empty {r['empty_documents']:,}   "
             f"text {r['text_bytes'] / 1e6:,.1f} MB   characters kept {meta.num_characters:,}",
             f"tokens     {r['tokens']:,} read, {meta.num_tokens:,} kept   ({meta.tokenizer}, vocab {meta.vocab_size})",
             f"sequences  train {meta.num_train:,}   val {meta.num_val:,}   (seq_len {meta.seq_len})",
             f"shards     train {len(meta.shards['train'])}   val {len(meta.shards['val'])}"]
    for s in r["sources"]:
        if s.get("keep") is not None:
            lines.append(f"mixture    {s['source']}: weight {s['weight']}, keep {s['keep']:.3f}, "
                         f"{s['kept_tokens']:,} of {s['tokens']:,} tokens")
    for b in r["first_bad"][:5]:
        lines.append(f"bad        {BadRecord(**b).where()}: {b['kind']}: {b['detail']}")
    p = r["peak_mb"]
    lines += [f"speed      {r['text_mb_per_s']:.2f} MB/s of text, {r['tokens_per_s']:,.0f} tokens/s "
              f"(tokenize {r['tokenize_seconds']:.1f} s, write {r['write_seconds']:.1f} s)",
              f"not timed  workers started in {r['startup_seconds']:.1f} s, tokenizer built in "
              f"{r['tokenizer_seconds']:.1f} s",
              f"memory     peak {p['total']:,.0f} MB (driver {p['driver']:,.0f} + {p['worker_processes']} "
              f"worker process(es) {p['workers']:,.0f})",
              f"seconds    {r['seconds']:.2f}"]
    return lines
