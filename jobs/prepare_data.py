"""Turn text into a token dataset (Parquet shards + meta.json) that `jobs.train` reads.

    python -m jobs.prepare_data                          # Python's docs, bytes, data/pydoc-byte
    python -m jobs.prepare_data --tokenizer bpe --out data/pydoc-bpe
    python -m jobs.prepare_data --source notes/ book.txt --out data/mine --seq-len 512

Everything runs offline: the default corpus is the English prose of the Python reference
documentation that every CPython ships (`pydoc_data.topics`), and BPE is trained locally.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cluster.data import DatasetMeta, check_out_dir, read_meta, write_dataset
from cluster.tokenizer import BPETokenizer, ByteTokenizer

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
    else:
        raise ValueError(f"tokenizer={tokenizer!r} must be 'byte' or 'bpe'")
    return write_dataset(docs, out, tok, seq_len, val_fraction=val_fraction, seed=seed,
                         source=described, overwrite=overwrite)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.prepare_data", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", nargs="+", default=["pydoc"], metavar="pydoc|PATH",
                        help="`pydoc` (Python's reference docs, the default) and/or .txt/.md "
                             "files or directories; each file is one document")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"dataset directory to create (default: {DEFAULT_OUT})")
    parser.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte",
                        help="byte: UTF-8 bytes, vocab 257; bpe: byte-level BPE trained on "
                             "the source (default: byte)")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="BPE vocabulary size, eos included (default: 4096)")
    parser.add_argument("--seq-len", type=int, default=256,
                        help="model context length; rows hold seq_len + 1 tokens (default: 256)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="share of sequences held out for validation, at least one "
                             "(default: 0.05)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sequence shuffle and train/val split (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    try:
        meta = prepare(args.source, args.out, args.tokenizer, args.vocab_size, args.seq_len,
                       args.val_fraction, args.seed, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    seconds = time.perf_counter() - began
    print(f"source     {meta.source}\n"
          f"documents  {meta.num_documents:,}   characters {meta.num_characters:,}\n"
          f"tokens     {meta.num_tokens:,}   ({meta.tokenizer}, vocab {meta.vocab_size})\n"
          f"sequences  train {meta.num_train:,}   val {meta.num_val:,}   "
          f"(seq_len {meta.seq_len})\n"
          f"shards     train {len(meta.shards['train'])}   val {len(meta.shards['val'])}\n"
          f"seconds    {seconds:.2f}\n"
          f"wrote      {args.out}")


if __name__ == "__main__":
    main()
