"""Where datasets and runs live: a local path or a `pyarrow.fs` URI (`s3://bucket/prefix`,
`gs://...`, `file:///...`), behind one small `Location` type.

Three things every reader and writer of the project shares:

- `locate(uri)` -> `Location(fs, path)`. S3 gets raymoe's own `S3FileSystem`: endpoint from
  `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (an S3-compatible store), region from
  `AWS_REGION` / `AWS_DEFAULT_REGION`, and credentials only from the standard AWS chain
  (environment, `~/.aws`, instance role): none is ever passed explicitly, so none can end up
  in a pickled filesystem, a stored config or a log. A URI with credentials in it is refused.
- `retrying(what, loc, fn)`: transient errors (connection reset, timeout, 5xx, throttling) are
  retried with bounded exponential backoff; each retry prints a line and is counted in `STATS`
  (the training loop turns the count into the `storage_retries` metric). Anything else (403,
  a malformed request) fails at once with the URI and what to do.
- `publish_dir` / `commit`: a dataset becomes visible all at once. Locally the staged
  directory is renamed into place; on an object store (no rename) it is uploaded under a
  temporary prefix, copied server-side into place with `meta.json` last (a prefix with
  `meta.json` is complete; readers never look at one without it), and the staging prefix is
  deleted.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

T = TypeVar("T")
MARKER = "meta.json"  # what makes a dataset complete


class StorageError(OSError):
    """A storage operation failed for good (permanent error, or retries exhausted)."""


# ---------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str
    """Path inside `fs` (for S3: `bucket/key/prefix`, no scheme)."""
    uri: str
    """The same place as the user writes it, for messages and configs."""

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> Location:
        path, uri = self.path.rstrip("/"), self.uri.rstrip("/")
        for p in parts:
            path, uri = f"{path}/{p}", f"{uri}/{p}"
        return Location(self.fs, path, uri)

    def sibling(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/').rsplit('/', 1)[0]}/{name}",
                        f"{self.uri.rstrip('/').rsplit('/', 1)[0]}/{name}")

    def info(self) -> pafs.FileInfo:
        return retrying("stat", self, lambda: self.fs.get_file_info(self.path))

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def children(self) -> list[Location]:
        """Direct children (files and sub-prefixes), sorted by name; [] if absent."""
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        infos = retrying("list", self, lambda: self.fs.get_file_info(sel))
        return sorted((self.join(i.base_name) for i in infos), key=lambda loc: loc.name)

    def files(self) -> list[tuple[str, int]]:
        """(path relative to this prefix, size) of every object below it."""
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=True)
        infos = retrying("list", self, lambda: self.fs.get_file_info(sel))
        base = self.path.rstrip("/") + "/"
        return sorted((i.path[len(base):], i.size) for i in infos if i.type == pafs.FileType.File)

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as f:
                return f.readall()
        try:
            return retrying("read", self, read)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri} does not exist") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        def write() -> None:
            if self.is_local:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        retrying("write", self, write)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def delete_dir(self) -> None:
        retrying("delete", self, lambda: self.fs.delete_dir(self.path))

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self.uri} is not a local path")
        return self.path


def native(loc: Location) -> Path | Location:
    """A local Location as a plain Path (what local callers and tests hold), else itself."""
    return Path(loc.path) if loc.is_local else loc


def is_uri(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path


def locate(path: str | Path | Location, timeout_s: float | None = None) -> Location:
    """A local path (made absolute) or a URI as a Location. `timeout_s`: S3 connect/request
    timeout (a stalled read fails after it and is retried)."""
    if isinstance(path, Location):
        return path
    if not is_uri(path):
        p = str(Path(path).expanduser().resolve())
        return Location(pafs.LocalFileSystem(), p, p)
    parsed = urlparse(path)
    if parsed.username or parsed.password or "access_key" in parsed.query or "secret_key" in parsed.query:
        raise ValueError(f"'{_redact(path)}' has credentials in it, which would be stored with the run's config; "
                         "remove them and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an "
                         "instance role) in the environment instead")
    if parsed.scheme == "file":
        return locate(parsed.path)
    if parsed.scheme == "s3":
        if parsed.query:
            raise ValueError(f"'{path}': options in the URI are not read; set AWS_ENDPOINT_URL (an "
                             "S3-compatible store) and AWS_REGION in the environment")
        fs = s3_filesystem(timeout_s=timeout_s)
        return Location(fs, f"{parsed.netloc}{parsed.path}".rstrip("/"), path.rstrip("/"))
    fs, inner = pafs.FileSystem.from_uri(path)
    return Location(fs, inner.rstrip("/"), path.rstrip("/"))


def _redact(uri: str) -> str:
    p = urlparse(uri)
    return f"{p.scheme}://***@{p.hostname or ''}{p.path}" if p.username or p.password else uri.split("?")[0] + "?***"


def s3_filesystem(timeout_s: float | None = None, retry_attempts: int = 1) -> pafs.S3FileSystem:
    """raymoe's S3 filesystem. `retry_attempts=1`: the SDK does not retry, `retrying` does (and
    reports it); Ray Train's uploads use a filesystem with the SDK's own retries instead."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kw: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=retry_attempts)}
    if endpoint:
        e = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kw.update(endpoint_override=e.netloc, scheme=e.scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    if timeout_s is not None:
        kw.update(connect_timeout=timeout_s, request_timeout=timeout_s)
    return pafs.S3FileSystem(**kw)


def ray_storage(loc: Location) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig."""
    if loc.is_local:
        return loc.path, None
    if isinstance(loc.fs, pafs.S3FileSystem):
        return loc.path, s3_filesystem(retry_attempts=5)
    return loc.path, loc.fs


# Environment variables a worker needs to reach the same store with the same identity. They are
# forwarded to Ray's processes as environment, never stored in the run.
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
           "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
           "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")


def credential_env() -> dict[str, str]:
    return {k: os.environ[k] for k in AWS_ENV if k in os.environ}


# ---------------------------------------------------------------------------- retries


@dataclass
class RetryPolicy:
    attempts: int = 6
    """Tries in all (the first plus retries)."""
    base_s: float = 0.2
    """Backoff before the first retry; doubles each time (with jitter)."""
    max_s: float = 5.0
    """Longest single backoff."""


@dataclass
class IOStats:
    """Process-wide counters (thread-safe): the training loop reports them as metrics."""
    retries: int = 0
    by_kind: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, kind: str) -> None:
        with self._lock:
            self.retries += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


STATS = IOStats()
POLICY = RetryPolicy()

# Lower-cased fragments of the SDK's messages -> the kind of transient fault.
_TRANSIENT = (
    ("reset", "connection reset"), ("curlcode: 56", "connection reset"), ("curlcode: 52", "connection reset"),
    ("connection refused", "connection refused"), ("curlcode: 7,", "connection refused"),
    ("timed out", "timeout"), ("timeout", "timeout"), ("curlcode: 28", "timeout"),
    ("slowdown", "throttled"), ("slow down", "throttled"), ("throttl", "throttled"),
    ("reduce your request rate", "throttled"), ("toomanyrequests", "throttled"), ("429", "throttled"),
    # S3 answers 503 when it throttles (SlowDown, and ServiceUnavailable on a hot prefix); the SDK
    # parses the error body only sometimes (not on every GetObject stream), so the status decides.
    ("503", "throttled"), ("service unavailable", "throttled"), ("service_unavailable", "throttled"),
    ("500", "server error 5xx"), ("502", "server error 5xx"), ("504", "server error 5xx"),
    ("internal error", "server error 5xx"), ("internalerror", "server error 5xx"),
    # A 5xx with a body on GetObject surfaces as a failed response stream.
    ("internal_failure", "server error 5xx"),
    ("slow_down", "throttled"), ("request_timeout", "timeout"),
    ("network_connection", "network error"), ("unexpected eof", "network error"),
)


def transient_kind(err: BaseException) -> str | None:
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return None
    if isinstance(err, (ConnectionError, TimeoutError)):
        return "timeout" if isinstance(err, TimeoutError) else "connection reset"
    msg = str(err).lower()
    if "access_denied" in msg or "accessdenied" in msg or "403" in msg or "forbidden" in msg:
        return None
    return next((kind for frag, kind in _TRANSIENT if frag in msg), None)


def _fix(err: BaseException, loc: Location) -> str:
    msg = str(err).lower()
    if "access_denied" in msg or "accessdenied" in msg or "403" in msg or "forbidden" in msg:
        return ("access denied: check the credentials in the environment (AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the node's instance role) and that they may read and "
                f"write {loc.uri}")
    if "nosuchbucket" in msg or "bucket" in msg and "not found" in msg:
        return "the bucket does not exist: create it or fix the URI"
    return "check the URI, the endpoint (AWS_ENDPOINT_URL) and the network"


def retrying(what: str, loc: Location, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """fn(), retried on transient errors with bounded exponential backoff."""
    policy = policy or POLICY
    for attempt in range(policy.attempts):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as err:
            kind = transient_kind(err)
            first_line = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
            if kind is None:
                raise StorageError(f"{what} {loc.uri} failed: {first_line}. Fix: {_fix(err, loc)}") from err
            if attempt + 1 == policy.attempts:
                raise StorageError(f"{what} {loc.uri} failed after {policy.attempts} attempts ({kind}: "
                                   f"{first_line}). Fix: {_fix(err, loc)}") from err
            delay = min(policy.max_s, policy.base_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            STATS.record(kind)
            print(f"[raymoe] storage: {what} {loc.uri}: {kind}; retry {attempt + 1}/{policy.attempts - 1} "
                  f"in {delay:.2f} s ({first_line[:160]})", flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- copying and publishing


def download(loc: Location, dst: Path) -> None:
    """Copy every object under `loc` into the local directory `dst`."""
    for rel, _ in loc.files():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(loc.join(rel).read_bytes())


def upload(src: Path, loc: Location, skip: tuple[str, ...] = ()) -> None:
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        if rel not in skip:
            # NOTE: one object in memory at a time; shards are tens of MB.
            loc.join(rel).write_bytes(f.read_bytes())


@contextlib.contextmanager
def local_copy(loc: Location | str | Path) -> Iterator[Path]:
    """`loc` as a local directory: itself if local, else a temporary download (removed after).
    Training and model loads read checkpoints by range instead (checkpoint.RemoteReader); this is
    for readers of local files only (accelerate's offloaded load)."""
    loc = locate(loc)
    if loc.is_local:
        yield Path(loc.path)
        return
    with tempfile.TemporaryDirectory(prefix="raymoe-copy-") as tmp:
        download(loc, Path(tmp))
        yield Path(tmp)


def occupied(loc: Location) -> bool:
    info = loc.info()
    if info.type == pafs.FileType.NotFound:
        return False
    # An empty directory (say, made by hand beforehand) is replaced anyway.
    return info.type == pafs.FileType.File or bool(loc.children())


def check_absent(out: str | Path | Location, overwrite: bool) -> None:
    """Raise FileExistsError if `out` holds something and `overwrite` is off."""
    out = locate(out)
    if occupied(out) and not overwrite:
        raise FileExistsError(f"data path '{out.uri}' already exists; pass overwrite=True "
                              "(--overwrite) to replace it")


def staging(out: Location) -> Location:
    """A fresh temporary prefix next to `out` for a writer to fill before `commit`."""
    return out.sibling(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def commit(staged: Location, out: Location, overwrite: bool, marker: str = MARKER) -> None:
    """Make the complete dataset at `staged` appear at `out` (see the module docstring)."""
    if out.is_local:
        _rename_into_place(Path(staged.path), Path(out.path), overwrite)
        return
    if occupied(out):
        if not overwrite:
            raise FileExistsError(f"data path '{out.uri}' already exists; pass overwrite=True "
                                  "(--overwrite) to replace it")
        # The old marker goes first: from here on, readers see no (half-replaced) dataset.
        if out.join(marker).exists():
            retrying("delete", out, lambda: out.fs.delete_file(out.join(marker).path))
        retrying("delete", out, lambda: out.fs.delete_dir_contents(out.path, missing_dir_ok=True))
    names = [rel for rel, _ in staged.files()]
    if marker not in names:
        raise StorageError(f"staged dataset {staged.uri} has no {marker}: not committing an incomplete dataset")
    for rel in [n for n in names if n != marker] + [marker]:  # the marker last
        src, dst = staged.join(rel), out.join(rel)
        retrying("copy", dst, lambda: out.fs.copy_file(src.path, dst.path))
    staged.delete_dir()


def publish_dir(local_dir: Path, out: str | Path | Location, overwrite: bool) -> None:
    """Publish the complete local directory `local_dir` (meta.json in it) at `out`, atomically
    for readers. The local directory is consumed (renamed or uploaded, then removed)."""
    out = locate(out)
    if out.is_local:
        _rename_into_place(local_dir, Path(out.path), overwrite)
        return
    staged = staging(out)
    try:
        upload(local_dir, staged)
        commit(staged, out, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            staged.fs.delete_dir(staged.path)
        raise
    shutil.rmtree(local_dir, ignore_errors=True)


def _rename_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if overwrite and occupied(locate(out_dir)):
        # A non-empty directory cannot be renamed over: move the old one aside first.
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out_dir)
    except OSError as err:
        # Another process published the same dataset while we were writing.
        raise FileExistsError(f"data path '{out_dir}' already exists; pass overwrite=True "
                              "(--overwrite) to replace it") from err


def local_staging_dir(out: Location) -> Path:
    """Where a writer builds a dataset before `publish_dir`: beside `out` when local (so the
    final rename stays on one filesystem), else a local temporary directory."""
    if out.is_local:
        tmp = Path(out.path).with_name(f"{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp
    return Path(tempfile.mkdtemp(prefix="raymoe-dataset-"))
