"""Corpus sources for data preparation: which files a `--source` names, and their records.

A source is `PATH[:WEIGHT]` where PATH is `pydoc` (the bundled Python reference docs), a file, a
directory (searched recursively) or a glob. Formats, by file name:

    .txt .md                         one document per file
    .jsonl .jsonl.gz .jsonl.zst      one record per line, the text in `text_field`
    .parquet                         one record per row, the text in column `text_field`

Every document has a key (source index, file index, line or row) that does not depend on
the machine or on the order in which Ray runs things; the dataset is built in key order.

A record that cannot be read is not a document: `iter_records` yields a `BadRecord` naming the
file, the line or row and the reason instead, so it is counted and the job can fail on too many.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
BAD_KINDS = ("not_json", "not_object", "missing_field", "not_string", "bad_utf8", "truncated",
             "missing_column")
READ_CHUNK = 1 << 20  # bytes read from a file at a time: lines are cut out of these


@dataclass
class SourceFile:
    path: str
    """Absolute path (or `pydoc`)."""
    format: str
    """text, jsonl or parquet (or pydoc)."""
    size: int
    """Bytes on disk (compressed size for .gz/.zst)."""
    source: int
    """Index of the --source that named it."""
    index: int
    """Index of the file within its source (sorted by path)."""


@dataclass
class Source:
    spec: str
    """The --source as given."""
    path: str
    weight: float | None
    """Share of the mixture's tokens, or None when no weights are given."""
    files: list[SourceFile] = field(default_factory=list)


@dataclass
class BadRecord:
    kind: str
    """One of BAD_KINDS."""
    file: str
    line: int
    """1-based line (jsonl, text) or 0-based row (parquet) where it was found."""
    detail: str
    count: int = 1
    """Records it stands for (a Parquet file without the column: all its rows)."""

    def where(self) -> str:
        return f"{self.file}:{self.line}" if not self.file.endswith(".parquet") else f"{self.file} row {self.line}"

    def to_dict(self) -> dict:
        return asdict(self)


def format_of(path: str) -> str | None:
    name = path.lower()
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def parse_source(spec: str) -> tuple[str, float | None]:
    """`PATH[:WEIGHT]` -> (PATH, WEIGHT or None). A path that itself ends in `:NUMBER` can be
    given as `PATH:NUMBER:1`."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            weight = float(tail)
        except ValueError:
            return spec, None
        if not weight > 0:
            raise ValueError(f"--source {spec!r}: weight {tail} must be > 0")
        return path, weight
    return spec, None


def discover(specs: list[str]) -> list[Source]:
    """The files of each source, sorted by path within a source. Raises with the fix when a
    source is missing, empty, of an unknown format, or when only some sources have weights."""
    sources = []
    for i, spec in enumerate(specs):
        path, weight = parse_source(spec)
        src = Source(spec=spec, path=path, weight=weight)
        if path == "pydoc":
            src.files = [SourceFile("pydoc", "pydoc", 0, i, 0)]
            sources.append(src)
            continue
        if glob.has_magic(path):
            found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            found = [p for p in found if format_of(p)]
            if not found:
                raise FileNotFoundError(f"--source {spec!r}: the pattern matches no "
                                        f"{'/'.join(ALL_SUFFIXES)} files")
        elif os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and format_of(str(p)))
            if not found:
                raise ValueError(f"--source {spec!r}: directory has no {'/'.join(ALL_SUFFIXES)} files")
        elif os.path.isfile(path):
            if not format_of(path):
                raise ValueError(f"--source {spec!r}: unknown format; name the file "
                                 f"{', '.join('*' + s for s in ALL_SUFFIXES)}")
            found = [path]
        else:
            raise FileNotFoundError(f"--source {spec!r}: '{path}' does not exist (give `pydoc`, a "
                                    "file, a directory or a glob)")
        src.files = [SourceFile(os.path.abspath(p), format_of(p), os.path.getsize(p), i, j)
                     for j, p in enumerate(found)]
        sources.append(src)
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError("give every --source a weight (`PATH:0.7`) or none: "
                         + ", ".join(s.spec for s in sources))
    return sources


# ---------------------------------------------------------------------------- records


def _open_bytes(path: str):
    """(decompressed byte stream with .read(n), raw file for .tell())."""
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if path.endswith(".zst"):
        # pyarrow's zstd stream raises on a truncated file (the `zstandard` package's stream
        # reader ends silently), and pyarrow is already a dependency.
        import pyarrow as pa

        return pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd"), raw
    return raw, raw


def _lines(path: str, progress: list[int]) -> Iterator[tuple[int, bytes | BadRecord]]:
    """(1-based line number, line bytes without the newline) from a possibly compressed file;
    a read error (truncated or corrupt stream) ends the file with a BadRecord. `progress[0]`
    follows the raw file position, for the ETA."""
    stream, raw = _open_bytes(path)
    # read1: one decompression step per call, so a stream that breaks off loses no line before
    # it; pyarrow's zstd stream has no read1 and drops the read that fails: keep those small.
    read = stream.read1 if isinstance(stream, gzip.GzipFile) or stream is raw else \
        (lambda n: stream.read(min(n, 1 << 16)))
    lineno, tail = 0, b""
    try:
        while True:
            try:
                chunk = read(READ_CHUNK)
            except (EOFError, OSError, zlib.error) as err:
                if tail:
                    lineno += 1  # the partial line before the break is lost with it
                yield lineno + (0 if tail else 1), BadRecord(
                    "truncated", path, lineno + (0 if tail else 1),
                    f"stream ends early ({err}); records after this line are lost")
                return
            finally:
                progress[0] = raw.tell()
            if not chunk:
                break
            parts = (tail + chunk).split(b"\n")
            tail = parts.pop()
            for line in parts:
                lineno += 1
                yield lineno, line
        if tail:
            yield lineno + 1, tail
    finally:
        stream.close()
        raw.close()


def iter_records(file: SourceFile, text_field: str = "text",
                 progress: list[int] | None = None) -> Iterator[tuple[int, str] | BadRecord]:
    """The records of one file in order: (line or row, text) or BadRecord."""
    progress = progress if progress is not None else [0]
    path = file.path
    if file.format == "pydoc":
        from pydoc_data.topics import topics

        for i, key in enumerate(sorted(topics)):
            yield i, topics[key]
        return
    if file.format == "text":
        with open(path, "rb") as f:
            data = f.read()
        progress[0] = len(data)
        try:
            yield 1, data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            yield BadRecord("bad_utf8", path, line, f"byte {err.start}: {err.reason}")
        return
    if file.format == "jsonl":
        for lineno, line in _lines(path, progress):
            if isinstance(line, BadRecord):
                yield line
                return
            if not line.strip():
                continue  # blank lines are no records (a trailing newline, a separator)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield BadRecord("bad_utf8", path, lineno, f"byte {err.start} of the line: {err.reason}")
                continue
            try:
                record = json.loads(text)
            except ValueError as err:
                yield BadRecord("not_json", path, lineno, str(err)[:120])
                continue
            if not isinstance(record, dict):
                yield BadRecord("not_object", path, lineno, f"a JSON {type(record).__name__}, not an object")
                continue
            value = record.get(text_field)
            if value is None:
                yield BadRecord("missing_field", path, lineno,
                                f"no {text_field!r} (keys: {sorted(record)[:8]}); set --text-field")
            elif not isinstance(value, str):
                yield BadRecord("not_string", path, lineno, f"{text_field!r} is a {type(value).__name__}")
            else:
                yield lineno, value
        return
    if file.format == "parquet":
        yield from _parquet_records(file, text_field, progress)
        return
    raise ValueError(f"{path}: unknown format {file.format!r}")


def _parquet_records(file: SourceFile, text_field: str, progress: list[int]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file.path)
    names = pf.schema_arrow.names
    if text_field not in names:
        yield BadRecord("missing_column", file.path, 0,
                        f"no column {text_field!r} (columns: {names[:8]}); set --text-field",
                        count=max(1, pf.metadata.num_rows))
        return
    kind = pf.schema_arrow.field(text_field).type
    is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    row = 0
    groups = pf.metadata.num_row_groups
    for g in range(groups):
        for batch in pf.iter_batches(batch_size=4096, row_groups=[g], columns=[text_field]):
            values = batch.column(0).to_pylist()
            for value in values:
                if value is None:
                    yield BadRecord("missing_field", file.path, row, f"{text_field!r} is null")
                elif not is_text or not isinstance(value, str):
                    yield BadRecord("not_string", file.path, row, f"{text_field!r} has type {kind}")
                else:
                    yield row, value
                row += 1
        progress[0] = file.size * (g + 1) // groups
