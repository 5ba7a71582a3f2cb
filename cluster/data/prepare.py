"""Writing datasets: the text corpus (tokenized into token shards) and the bundled task datasets,
prepared on first use when a job names a built-in dataset. `python -m jobs.prepare_data` is its CLI.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cluster.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer
from cluster.data.tokens import DatasetMeta, check_out_dir, read_meta, write_dataset

DEFAULT_OUT = "data/pydoc-byte"
TEXT_SUFFIXES = (".txt", ".md")


def load_documents(sources: list[str]) -> tuple[list[str], str]:
    """Documents (one per pydoc topic or per file) and a one-line description of the source.

    `sources` holds `pydoc` and/or paths to .txt/.md files or directories (searched
    recursively). Order is sorted, so the dataset does not depend on directory listing order.
    """
    docs, described = [], []
    for source in sources:
        if source == "pydoc":
            from pydoc_data.topics import topics

            docs += [topics[key] for key in sorted(topics)]
            described.append(f"pydoc_data.topics (Python {sys.version.split()[0]})")
            continue
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"source '{source}' does not exist (give `pydoc`, a text "
                                    "file, or a directory of .txt/.md files)")
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"source '{source}' has no {'/'.join(TEXT_SUFFIXES)} files")
        # errors="replace": one stray byte should not stop a corpus build.
        docs += [p.read_text(encoding="utf-8", errors="replace") for p in files]
        described.append(source)
    if not any(docs):
        raise ValueError(f"sources {sources} contain no text")
    return docs, ", ".join(described)


def prepare(source: list[str] | str = "pydoc", out: str | Path = DEFAULT_OUT,
            tokenizer: str = "byte", vocab_size: int = 4096, seq_len: int = 256,
            val_fraction: float = 0.05, seed: int = 0, overwrite: bool = False) -> DatasetMeta:
    """Load the documents, build the tokenizer, write the dataset at `out`."""
    sources = [source] if isinstance(source, str) else list(source)
    check_out_dir(out, overwrite)  # before loading and training, not after
    docs, described = load_documents(sources)
    if tokenizer == "byte":
        tok = ByteTokenizer()
    elif tokenizer == "bpe":
        # NOTE: trained on all documents, val included: the windows are split only after
        # tokenization. The tokenizer sees val text, the model does not.
        tok = BPETokenizer.train(docs, vocab_size)
    elif Path(tokenizer).is_dir():  # an existing tokenizer: an imported model's (runs/NAME/tokenizer)
        tok = load_tokenizer(tokenizer)
    else:
        raise ValueError(f"tokenizer={tokenizer!r} must be 'byte', 'bpe' or a tokenizer directory (runs/NAME/tokenizer)")
    return write_dataset(docs, out, tok, seq_len, val_fraction=val_fraction, seed=seed,
                         source=described, overwrite=overwrite)


LOCAL_LIMIT_BYTES = 64 << 20  # `auto` keeps text corpora up to this size in one process


def choose_engine(sources: list[str], tokenizer: str, engine: str = "auto") -> str:
    """`local` (write_dataset in this process: the whole stream in memory, no Ray start-up) or
    `ray` (cluster.data.pipeline: any format, weights, tokenizer.json, bounded memory).

    `auto` picks local only for unweighted pydoc/.txt/.md sources of at most LOCAL_LIMIT_BYTES
    with the byte or bpe tokenizer: the bundled corpus stays a sub-second job."""
    if engine not in ("auto", "local", "ray"):
        raise ValueError(f"engine={engine!r} must be auto, local or ray")
    if engine != "auto":
        return engine
    from cluster.data.corpus import discover

    if tokenizer not in ("byte", "bpe"):
        return "ray"
    try:
        found = discover(sources)
    except (FileNotFoundError, ValueError):
        return "local"  # let the local loader raise its own message
    if any(s.weight is not None for s in found):
        return "ray"
    files = [f for s in found for f in s.files]
    if any(f.format not in ("pydoc", "text") for f in files) or sum(f.size for f in files) > LOCAL_LIMIT_BYTES:
        return "ray"
    return "local"


def ensure_default_dataset(out_dir: str | Path, seq_len: int,
                           tokenizer: str = "byte") -> DatasetMeta:
    """The built-in pydoc dataset at `out_dir`, prepared on first use."""
    try:
        return prepare("pydoc", out_dir, tokenizer=tokenizer, seq_len=seq_len)
    except FileExistsError:
        pass  # prepared earlier, or by another process just now: read it
    meta = read_meta(out_dir)
    if (meta.seq_len, meta.tokenizer) != (seq_len, tokenizer):
        raise ValueError(
            f"data path '{out_dir}' holds seq_len={meta.seq_len}, tokenizer={meta.tokenizer!r} "
            f"but the job wants seq_len={seq_len}, tokenizer={tokenizer!r}; choose another "
            f"data.path or rerun `python -m jobs.prepare_data --out {out_dir} --overwrite`")
    return meta


def prepare_task_data(task: str, source: str, out: str | Path, **kw):
    """A forecasting or image-text sample dataset (see cluster.forecasting / cluster.image_text)."""
    if task == "forecast":
        from cluster.data.forecast import prepare_forecast

        return prepare_forecast(source, out, **kw)
    from cluster.data.image_text import prepare_image_text

    return prepare_image_text(source, out, **kw)


def ensure_task_dataset(task: str, source: str, out_dir: str | Path, **kw):
    """The bundled dataset `source` for `task` at `out_dir`, prepared on first use; an existing
    one must have been made with the same settings."""
    import json

    try:
        return prepare_task_data(task, source, out_dir, **kw)
    except FileExistsError:
        pass
    from cluster.data import storage

    info = json.loads(storage.locate(out_dir).join("meta.json").read_text()).get("info", {})
    differ = {k: (info.get(k), v) for k, v in kw.items() if k in info and info[k] != v}
    if differ:
        raise ValueError(f"data path '{out_dir}' was prepared with "
                         f"{', '.join(f'{k}={a}' for k, (a, _) in differ.items())} but the job wants "
                         f"{', '.join(f'{k}={b}' for k, (_, b) in differ.items())}; choose another data.path or "
                         f"rerun `python -m jobs.prepare_data --task {task} --out {out_dir} --overwrite`")
