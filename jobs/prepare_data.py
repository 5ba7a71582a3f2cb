"""Turn text, a time series or image-caption pairs into a dataset (Parquet shards + meta.json)
that `jobs.train` reads.

    python -m jobs.prepare_data                          # Python's docs, bytes, data/pydoc-byte
    python -m jobs.prepare_data --tokenizer bpe --out data/pydoc-bpe
    python -m jobs.prepare_data --source notes/ book.txt --out data/mine --seq-len 512
    python -m jobs.prepare_data --source 'web/*.jsonl.gz:0.7' --source code/:0.3 \\
        --tokenizer runs/imported/tokenizer --seq-len 2048 --out data/mix    # Ray Data pipeline
    python -m jobs.prepare_data --source corpus/ --dry-run                   # what would be read
    python -m jobs.prepare_data --task forecast --source co2 --out data/co2     # or sunspots, or a CSV
    python -m jobs.prepare_data --task image_text --source digits --out data/digits   # or a folder
    python -m jobs.prepare_data --out s3://bucket/datasets/pydoc-byte   # any pyarrow.fs URI

Text sources: .txt/.md (one document per file), .jsonl/.jsonl.gz/.jsonl.zst and .parquet (the
text in --text-field). Small unweighted text corpora are written in this process; everything
else runs on Ray Data (cluster/data/pipeline.py) on the cluster at RAY_ADDRESS / --ray-address,
or on a local Ray started here: bounded memory, byte-identical output whatever the CPU count,
bad records counted and bounded by --max-bad-fraction, and a re-run after a crash re-uses the
files already tokenized. Everything runs offline: the default corpus is the English prose of the
Python reference documentation that every CPython ships (`pydoc_data.topics`), and BPE is trained
locally.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cluster.data.prepare import DEFAULT_OUT, choose_engine, prepare, prepare_task_data
from cluster.data.storage import StorageError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.prepare_data", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["lm", "forecast", "image_text"], default="lm",
                        help="lm: token sequences (default); forecast: windows over a series; "
                             "image_text: image-caption pairs")
    parser.add_argument("--source", nargs="+", action="extend", default=None, metavar="SOURCE",
                        help="lm: `pydoc` (Python's reference docs, the default), files, directories or "
                             "globs of .txt/.md/.jsonl[.gz|.zst]/.parquet, each optionally PATH:WEIGHT "
                             "(weights: a mixture by token share, documents sampled with --seed; all "
                             "sources or none); repeatable; forecast: `co2` (default), `sunspots` or a "
                             "CSV file; image_text: `digits` (default) or a folder with captions.tsv")
    parser.add_argument("--context-len", type=int, default=64, help="forecast: input window (default: 64)")
    parser.add_argument("--horizon", type=int, default=16, help="forecast: steps predicted (default: 16)")
    parser.add_argument("--text-len", type=int, default=40, help="image_text: caption tokens (default: 40)")
    parser.add_argument("--image-size", type=int, default=8, help="image_text: image side (default: 8)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"dataset directory or URI (s3://bucket/prefix) to create; published atomically "
                             f"(meta.json last) (default: {DEFAULT_OUT})")
    parser.add_argument("--tokenizer", default="byte", metavar="byte|bpe|PATH",
                        help="byte: UTF-8 bytes, vocab 257; bpe: byte-level BPE trained on the source "
                             "(on --bpe-sample-mb of it on the Ray path); PATH: a tokenizer.json or a "
                             "directory holding one, with its bos/eos from tokenizer_config.json "
                             "(default: byte)")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="BPE vocabulary size, eos included (default: 4096)")
    parser.add_argument("--bpe-sample-mb", type=float, default=256.0,
                        help="Ray path: MB of text the BPE tokenizer is trained on (default: 256)")
    parser.add_argument("--seq-len", type=int, default=256,
                        help="model context length; rows hold seq_len + 1 tokens (default: 256)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="share held out for validation: lm sequences (default 0.05), the forecast "
                             "series' tail (default 0.2), image_text pairs (default 0.2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sequence shuffle, train/val split and mixture (default: 0)")
    parser.add_argument("--text-field", default="text",
                        help="JSON lines key / Parquet column holding the text (default: text)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.001,
                        help="fail, publishing nothing, when more of the records than this are bad "
                             "(not JSON, no text field, undecodable, truncated file; default: 0.001)")
    parser.add_argument("--engine", choices=["auto", "local", "ray"], default="auto",
                        help="local: one process, whole stream in memory; ray: the Ray Data pipeline; "
                             "auto: local for unweighted .txt/.md/pydoc up to 64 MB with byte/bpe, "
                             "else ray (default: auto)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="Ray path: concurrent tasks per stage (default: every CPU the cluster has); "
                             "also the CPUs of a local Ray started here")
    parser.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be read, then stop")
    parser.add_argument("--report", default=None, metavar="FILE",
                        help="Ray path: write the run's counts, times and peak memory as JSON here")
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
        except (FileNotFoundError, FileExistsError, ValueError, StorageError) as err:
            parser.exit(2, f"error: {err}\n")
        print(f"source     {meta.source}\n"
              f"samples    train {meta.num_train:,}   val {meta.num_val:,}   fields "
              + ", ".join(f"{k} {tuple(f['shape'])} {f['dtype']}" for k, f in meta.fields.items())
              + f"\nseconds    {time.perf_counter() - began:.2f}\nwrote      {args.out}")
        return
    sources = args.source or ["pydoc"]
    val_fraction = 0.05 if args.val_fraction is None else args.val_fraction
    try:
        engine = choose_engine(sources, args.tokenizer, args.engine)
        if args.dry_run:
            from cluster.data.corpus import discover
            from cluster.data.pipeline import describe

            print(describe(discover(sources)))
            print(f"would write {args.out} with engine {engine}, tokenizer {args.tokenizer}, "
                  f"seq_len {args.seq_len}, val_fraction {val_fraction}, seed {args.seed}")
            return
        if engine == "ray":
            meta = _prepare_on_ray(args, sources, val_fraction)
            print(f"wrote      {args.out}")
            return
        if args.tokenizer not in ("byte", "bpe"):
            raise ValueError(f"--engine local reads --tokenizer byte or bpe, not {args.tokenizer!r}; "
                             "use --engine ray for a tokenizer.json")
        meta = prepare(sources, args.out, args.tokenizer, args.vocab_size, args.seq_len,
                       val_fraction, args.seed, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, StorageError) as err:
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


def _prepare_on_ray(args, sources: list[str], val_fraction: float):
    import ray

    from cluster.data.pipeline import CorpusOptions, prepare_corpus, summary_lines

    opts = CorpusOptions(sources=sources, out=args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                         seq_len=args.seq_len, val_fraction=val_fraction, seed=args.seed,
                         text_field=args.text_field, max_bad_fraction=args.max_bad_fraction,
                         num_cpus=args.num_cpus, bpe_sample_mb=args.bpe_sample_mb, overwrite=args.overwrite)
    opts.check()
    import logging

    import ray.data  # noqa: F401  (configures its loggers on import: quiet them after)

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # our progress line replaces its log
    if args.ray_address:
        ray.init(address=args.ray_address, configure_logging=False, log_to_driver=False)
    else:
        ray.init(num_cpus=args.num_cpus, configure_logging=False, log_to_driver=False)
    try:
        meta, report = prepare_corpus(opts, print_fn=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        ray.shutdown()
    print("\n".join(summary_lines(meta, report)))
    if args.report:
        import json
        from pathlib import Path

        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    return meta


if __name__ == "__main__":
    main()
