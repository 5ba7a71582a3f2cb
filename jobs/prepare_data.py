"""Turn text, a time series or image-caption pairs into a dataset (Parquet shards + meta.json)
that `jobs.train` reads.

    python -m jobs.prepare_data                          # Python's docs, bytes, data/pydoc-byte
    python -m jobs.prepare_data --tokenizer bpe --out data/pydoc-bpe
    python -m jobs.prepare_data --source notes/ book.txt --out data/mine --seq-len 512
    python -m jobs.prepare_data --task forecast --source co2 --out data/co2     # or sunspots, or a CSV
    python -m jobs.prepare_data --task image_text --source digits --out data/digits   # or a folder

Everything runs offline: the default corpus is the English prose of the Python reference
documentation that every CPython ships (`pydoc_data.topics`), and BPE is trained locally.
"""

from __future__ import annotations

import argparse
import time

from cluster.data.prepare import DEFAULT_OUT, prepare, prepare_task_data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.prepare_data", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["lm", "forecast", "image_text"], default="lm",
                        help="lm: token sequences (default); forecast: windows over a series; "
                             "image_text: image-caption pairs")
    parser.add_argument("--source", nargs="+", default=None, metavar="SOURCE",
                        help="lm: `pydoc` (Python's reference docs, the default) and/or .txt/.md files or "
                             "directories, each file one document; forecast: `co2` (default), `sunspots` "
                             "or a CSV file; image_text: `digits` (default) or a folder with captions.tsv")
    parser.add_argument("--context-len", type=int, default=64, help="forecast: input window (default: 64)")
    parser.add_argument("--horizon", type=int, default=16, help="forecast: steps predicted (default: 16)")
    parser.add_argument("--text-len", type=int, default=40, help="image_text: caption tokens (default: 40)")
    parser.add_argument("--image-size", type=int, default=8, help="image_text: image side (default: 8)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"dataset directory to create (default: {DEFAULT_OUT})")
    parser.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte",
                        help="byte: UTF-8 bytes, vocab 257; bpe: byte-level BPE trained on "
                             "the source (default: byte)")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="BPE vocabulary size, eos included (default: 4096)")
    parser.add_argument("--seq-len", type=int, default=256,
                        help="model context length; rows hold seq_len + 1 tokens (default: 256)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="share held out for validation: lm sequences (default 0.05), the forecast "
                             "series' tail (default 0.2), image_text pairs (default 0.2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sequence shuffle and train/val split (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    if args.task != "lm":
        source = (args.source or ["co2" if args.task == "forecast" else "digits"])[0]
        kw = (dict(context_len=args.context_len, horizon=args.horizon) if args.task == "forecast" else
              dict(text_len=args.text_len, image_size=args.image_size))
        try:
            meta = prepare_task_data(args.task, source, args.out, val_fraction=args.val_fraction or 0.2,
                                     seed=args.seed, overwrite=args.overwrite, **kw)
        except (FileNotFoundError, FileExistsError, ValueError) as err:
            parser.exit(2, f"error: {err}\n")
        print(f"source     {meta.source}\n"
              f"samples    train {meta.num_train:,}   val {meta.num_val:,}   fields "
              + ", ".join(f"{k} {tuple(f['shape'])} {f['dtype']}" for k, f in meta.fields.items())
              + f"\nseconds    {time.perf_counter() - began:.2f}\nwrote      {args.out}")
        return
    try:
        meta = prepare(args.source or ["pydoc"], args.out, args.tokenizer, args.vocab_size, args.seq_len,
                       0.05 if args.val_fraction is None else args.val_fraction, args.seed, args.overwrite)
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
