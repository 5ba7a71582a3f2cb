"""Data preparation throughput and memory: the Ray Data pipeline (cluster/data/pipeline.py) with
1 and 2 CPUs, byte and BPE tokenizers, against the single-process writer (tokens.write_dataset).

    python -m jobs.bench data                                  # 200 MB, 1 GB, 2 GB; byte and bpe; 1 and 2 CPUs
    python -m jobs.bench data --sizes 200MB --tokenizers byte  # one size
    python -m jobs.bench data --make-corpus data/corpus-1GB --sizes 1GB   # only write a corpus

The corpus is generated from the bundled text (pydoc_data.topics): each document draws its own
paragraphs from the whole set in its own order and is numbered, so no two documents are equal;
sizes are of the uncompressed JSON text, in .jsonl.gz files of --file-mb each. Generated once per
size under --corpus-root and reused.

Each run is a fresh `python -m jobs.prepare_data` process driving one Ray cluster that this
benchmark starts (ray.init, with as many CPUs as the largest --cpus), so every run's peak memory
(VmHWM summed over the driver and the run's own worker processes; Ray's daemons and object store
excluded) is its own. Speeds are of the whole job (tokenize + write), without Ray's start-up.
The single-process writer runs in a fresh process too, on sizes up to --local-max.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CORPUS_VERSION = 1


def parse_size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def make_corpus(out_dir: str | Path, text_bytes: int, file_bytes: int = 64_000_000, seed: int = 0) -> Path:
    """JSON lines (.jsonl.gz) of about `text_bytes` of JSON text in files of about `file_bytes`,
    made from pydoc_data.topics; reused when `out_dir` already holds the same corpus."""
    from pydoc_data.topics import topics

    out_dir = Path(out_dir)
    stamp = {"version": CORPUS_VERSION, "text_bytes": text_bytes, "file_bytes": file_bytes, "seed": seed}
    marker = out_dir / "corpus.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    paragraphs = [p.strip() for key in sorted(topics) for p in topics[key].split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    written, part, doc = 0, 0, 0
    while written < text_bytes:
        name = out_dir / f"part-{part:05d}.jsonl.gz"
        in_file = 0
        with gzip.open(name, "wt", encoding="utf-8", compresslevel=3) as f:
            while in_file < file_bytes and written < text_bytes:
                picks = rng.integers(0, len(paragraphs), size=int(rng.integers(2, 24)))
                text = f"Document {doc}.\n\n" + "\n\n".join(paragraphs[i] for i in picks)
                line = json.dumps({"id": doc, "text": text}) + "\n"
                f.write(line)
                in_file += len(line)
                written += len(line)
                doc += 1
        part += 1
    marker.write_text(json.dumps(stamp))
    return out_dir


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc defaults: a fair peak
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_ray(corpus: Path, out: Path, tokenizer: str, cpus: int, address: str, seq_len: int,
            bpe_sample_mb: float) -> dict:
    report = out.with_name(out.name + ".report.json")
    cmd = [sys.executable, "-m", "jobs.prepare_data", "--engine", "ray", "--source", str(corpus),
           "--out", str(out), "--tokenizer", tokenizer, "--num-cpus", str(cpus), "--seq-len", str(seq_len),
           "--bpe-sample-mb", str(bpe_sample_mb), "--ray-address", address, "--report", str(report),
           "--overwrite"]
    subprocess.run(cmd, check=True, env=_env(), cwd=REPO)
    return json.loads(report.read_text())


def run_local(corpus: Path, out: Path, tokenizer: str, seq_len: int) -> dict:
    """tokens.write_dataset in a fresh process over the same documents (streamed in; the token
    stream is what it holds)."""
    code = f"""
import json, time, resource
from pathlib import Path
from cluster.data.corpus import discover, iter_records, BadRecord
from cluster.data.tokenizer import ByteTokenizer, BPETokenizer
from cluster.data.tokens import write_dataset
tok = ByteTokenizer() if {tokenizer!r} == "byte" else BPETokenizer.load({tokenizer!r})
stats = {{"bytes": 0}}
def docs():
    for src in discover([{str(corpus)!r}]):
        for f in src.files:
            for rec in iter_records(f):
                if not isinstance(rec, BadRecord):
                    stats["bytes"] += len(rec[1].encode())
                    yield rec[1]
t = time.monotonic()
meta = write_dataset(docs(), {str(out)!r}, tok, {seq_len}, overwrite=True)
seconds = time.monotonic() - t
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({{"seconds": seconds, "text_bytes": stats["bytes"], "tokens": meta.num_tokens,
                  "peak_mb": {{"total": peak / 1024}}}}))
"""
    result = subprocess.run([sys.executable, "-c", code], check=True, env=_env(), cwd=REPO,
                            capture_output=True, text=True)
    rep = json.loads(result.stdout.strip().splitlines()[-1])
    rep["text_mb_per_s"] = rep["text_bytes"] / 1e6 / rep["seconds"]
    rep["tokens_per_s"] = rep["tokens"] / rep["seconds"]
    return rep


def main(argv=None, from_cli: bool = False) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["200MB", "1GB", "2GB"], help="uncompressed JSON text per corpus")
    p.add_argument("--cpus", nargs="+", type=int, default=[1, 2], help="Ray tasks at once (default: 1 2)")
    p.add_argument("--tokenizers", nargs="+", choices=["byte", "bpe"], default=["byte", "bpe"])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--bpe-sample-mb", type=float, default=16.0, help="text the BPE is trained on (default: 16)")
    p.add_argument("--file-mb", type=float, default=32.0, help="uncompressed MB per corpus file (default: 32)")
    p.add_argument("--local-max", default="200MB", help="largest corpus given to the single-process writer")
    p.add_argument("--corpus-root", default=str(REPO / "data" / "bench-corpus"))
    p.add_argument("--make-corpus", metavar="DIR", help="only write the corpus of --sizes[0] into DIR")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    file_bytes = int(args.file_mb * 1e6)
    if args.make_corpus:
        make_corpus(args.make_corpus, parse_size(args.sizes[0]), file_bytes)
        print(f"wrote {args.make_corpus}")
        return 0
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    ray.init(num_cpus=max(args.cpus), configure_logging=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="raymoe-bench-data-", dir=str(REPO / "data")) as tmp:
            for size in args.sizes:
                began = time.monotonic()
                corpus = make_corpus(Path(args.corpus_root) / f"corpus-{size}", parse_size(size), file_bytes)
                print(f"corpus {size}: {corpus} ({time.monotonic() - began:.0f} s)", file=sys.stderr)
                for tok in args.tokenizers:
                    bpe_file = None
                    for cpus in args.cpus:
                        out = Path(tmp) / f"{size}-{tok}-{cpus}"
                        rep = run_ray(corpus, out, tok, cpus, address, args.seq_len, args.bpe_sample_mb)
                        results.append({"size": size, "tokenizer": tok, "engine": "ray", "cpus": cpus, **_pick(rep)})
                        _print_row(results[-1])
                        if tok == "bpe":
                            bpe_file = Path(tmp) / f"tokenizer-{size}.json"
                            shutil.copy(out / "tokenizer.json", bpe_file)
                        shutil.rmtree(out)
                    if parse_size(size) <= parse_size(args.local_max):
                        out = Path(tmp) / f"{size}-{tok}-local"
                        rep = run_local(corpus, out, "byte" if tok == "byte" else str(bpe_file), args.seq_len)
                        results.append({"size": size, "tokenizer": tok, "engine": "single-process", "cpus": 1,
                                        **_pick(rep)})
                        _print_row(results[-1])
                        shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()
    print(f"\n{'size':>6s} {'tokenizer':>9s} {'engine':>14s} {'cpus':>4s} {'MB/s':>7s} {'tokens/s':>11s} "
          f"{'seconds':>8s} {'peak MB':>8s}")
    for r in results:
        print(f"{r['size']:>6s} {r['tokenizer']:>9s} {r['engine']:>14s} {r['cpus']:4d} {r['text_mb_per_s']:7.2f} "
              f"{r['tokens_per_s']:11,.0f} {r['seconds']:8.1f} {r['peak_mb']:8.0f}")
    for size in args.sizes:
        for tok in args.tokenizers:
            by = {r["cpus"]: r for r in results if (r["size"], r["tokenizer"], r["engine"]) == (size, tok, "ray")}
            if 1 in by and 2 in by:
                print(f"{size} {tok}: 2 CPUs / 1 CPU = {by[2]['text_mb_per_s'] / by[1]['text_mb_per_s']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "args": vars(args)}, indent=1))
        print(f"wrote {args.out}")
    return 0


def _pick(rep: dict) -> dict:
    out = {k: rep[k] for k in ("seconds", "text_bytes", "tokens", "text_mb_per_s", "tokens_per_s")}
    out["peak_mb"] = rep["peak_mb"]["total"]
    if "driver" in rep["peak_mb"]:
        out["peak_detail"] = rep["peak_mb"]
        out["tokenize_seconds"], out["write_seconds"] = rep["tokenize_seconds"], rep["write_seconds"]
    return out


def _print_row(r: dict) -> None:
    print(f"{r['size']} {r['tokenizer']} {r['engine']} cpus={r['cpus']}: {r['text_mb_per_s']:.2f} MB/s, "
          f"{r['tokens_per_s']:,.0f} tokens/s, {r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MB", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
