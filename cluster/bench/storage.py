"""Training data and checkpoints from an S3 API vs local disk: shard read throughput, training
tokens/s of `moe_small` with the shard prefetch on and off, with the stalls waiting for data
(`--parts train`); the seconds to open a dataset of many shards, the driver's footer check serial
and threaded vs a worker's (`startup`); loading the model + AdamW state from the bucket, downloaded
whole vs by range (`checkpoint`). The last two go through a proxy adding `--latency-ms` to each
request.

    python -m jobs.bench storage                 # moto's S3 server on 127.0.0.1 (needs the dev extra)
    python -m jobs.bench storage --repeats 5 --steps 12 --out storage.json
    python -m jobs.bench storage --config moe_debug  # a smaller model, for a busy machine
    python -m jobs.bench storage --parts checkpoint --repeats 1

The S3 server is moto (`moto[server]`, in-memory) in a process of its own, so its request
handling does not share this process's interpreter; credentials are fake and local. The same
dataset (pydoc topics at the config's seq_len, small shards so that a short run crosses
several) is written to disk and to the bucket. Runs are interleaved (disk/S3 x prefetch on/off
in turn, `--repeats` rounds) and medians reported, since the machine may be shared. A stall is
a shard the loop had to wait for; the first shard always is one, so stalls are counted after it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

BUCKET = "raymoe-bench"


def start_s3_server() -> tuple[subprocess.Popen, str]:
    try:
        import moto  # noqa: F401
    except ImportError:
        raise SystemExit("the storage benchmark needs moto's S3 server: pip install -e '.[dev]'") from None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("moto's S3 server did not start") from None
            time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}"


def read_throughput(uri: str) -> dict:
    """Every train shard read and decoded once, in file order: MB/s of Parquet bytes."""
    from cluster.data import storage
    from cluster.data.tokens import read_meta, read_shard

    root = storage.locate(uri)
    meta = read_meta(root)
    sizes = dict(root.files())
    t0 = time.perf_counter()
    for s in meta.shards["train"]:
        read_shard(root.join(s.file), meta.seq_len + 1)
    seconds = time.perf_counter() - t0
    total = sum(sizes[s.file] for s in meta.shards["train"])
    return {"mb_per_s": total / seconds / 1e6, "seconds": seconds, "bytes": total}


@contextmanager
def latency_proxy(endpoint: str, latency_ms: float):
    """The endpoint to read through: a proxy in front of `endpoint` that answers each request
    `latency_ms` late (an object store's time to first byte, tens of ms, where moto alone
    answers in a few), or `endpoint` itself at 0. Requests wait in parallel, as they would on
    the network."""
    from cluster.bench.http_proxy import ForwardingProxy

    if latency_ms <= 0:
        yield endpoint
        return
    proxy = ForwardingProxy(int(endpoint.rsplit(":", 1)[1]), before=lambda _: time.sleep(latency_ms / 1e3) or False)
    try:
        yield proxy.endpoint
    finally:
        proxy.close()


def startup_checks(uri: str, repeats: int) -> dict:
    """Seconds to open a dataset of many small shards, the three ways there are (median of
    `repeats`): the driver's check of every footer one at a time and FOOTER_THREADS at a time, and
    a worker's open (meta.json and one listing; each shard is checked when it is read)."""
    from cluster.data.tokens import FOOTER_THREADS, read_meta

    ways = {"driver_footers_1_thread": dict(verify="footers", threads=1),
            f"driver_footers_{FOOTER_THREADS}_threads": dict(verify="footers", threads=FOOTER_THREADS),
            "worker_listing": dict(verify="listing")}
    seconds = {k: [] for k in ways}
    for _ in range(repeats):
        for name, kw in ways.items():
            t0 = time.perf_counter()
            read_meta(uri, **kw)
            seconds[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in seconds.items()}


def checkpoint_loads(job, uri: str, repeats: int, read_endpoint: str | None = None) -> dict:
    """Seconds, bytes and requests to load the job's model and AdamW state (after one step) from a
    checkpoint in the bucket at `uri`, the ways there are (median of `repeats`, interleaved):
    downloaded whole first (what loads did before), by range one GET at a time, by range with
    READ_THREADS in flight (what they do), and the model alone by range (jobs.generate/export)."""
    import archs
    from cluster import checkpoint
    from cluster.data import storage
    from cluster.train.optim import build_optimizer

    def fresh():
        torch.manual_seed(0)
        model = archs.build(job.model)
        return model, build_optimizer(model, 1e-3, 0.0, (0.9, 0.95))

    model, opt = fresh()
    with tempfile.TemporaryDirectory(prefix="raymoe-bench-ckpt-") as tmp:
        model(torch.zeros(1, 8, dtype=torch.long)).float().mean().backward()
        opt.step()  # AdamW state exists: the checkpoint is model + 2 moments
        local = Path(tmp) / checkpoint.dir_name(1)
        checkpoint.save(local, model, opt, {"step": 1}, job.model, 0, 1)
        remote = storage.locate(uri).join(checkpoint.dir_name(1))
        for f in local.iterdir():
            remote.join(f.name).write_bytes(f.read_bytes())
        shard_bytes = sum(f.stat().st_size for f in local.glob("*.distcp"))

    def downloaded():
        m, o = fresh()
        with storage.local_copy(remote) as copy:
            checkpoint.load(copy, m, o, job.model, 0, 1)
        return {"bytes": sum(size for _, size in remote.files()), "requests": None}

    def ranged(threads: int, model_only: bool = False):
        checkpoint.READ_THREADS, saved = threads, checkpoint.READ_THREADS
        readers = []
        real = checkpoint.dcp_load
        checkpoint.dcp_load = lambda *a, **k: readers.append(real(*a, **k)) or readers[-1]
        try:
            m, o = fresh()
            if model_only:
                checkpoint.load_model_weights(remote, m, job.model)
            else:
                checkpoint.load(remote, m, o, job.model, 0, 1)
        finally:
            checkpoint.dcp_load, checkpoint.READ_THREADS = real, saved
        return {"bytes": readers[-1].bytes_read, "requests": readers[-1].requests}

    from cluster.checkpoint import READ_THREADS

    if read_endpoint:  # the loads go through the latency proxy (the upload above did not)
        os.environ["AWS_ENDPOINT_URL"] = read_endpoint
        remote = storage.locate(remote.uri)
    ways = {"downloaded_whole": downloaded, "by_range_1_thread": lambda: ranged(1),
            f"by_range_{READ_THREADS}_threads": lambda: ranged(READ_THREADS),
            f"model_only_by_range_{READ_THREADS}_threads": lambda: ranged(READ_THREADS, True)}
    runs = {k: [] for k in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            r = fn()
            runs[name].append({**r, "seconds": time.perf_counter() - t0})
    return {"shard_bytes": shard_bytes, "ways": {k: {"seconds": statistics.median(r["seconds"] for r in v),
                                                     "bytes": v[0]["bytes"], "requests": v[0]["requests"]}
                                                 for k, v in runs.items()}}


def train_run(job, uri: str, prefetch: bool, steps: int) -> dict:
    """`steps` optimizer steps of the job's model on data at `uri`, one process."""
    import archs
    from cluster.data.tokens import GlobalOrder, ShardedBatches, TokenDataset
    from cluster.tasks.lm import LanguageModeling
    from cluster.train.optim import build_optimizer
    from cluster.train.precision import DynamicLossScaler
    from cluster.train.step import train_step

    t = job.train
    torch.manual_seed(0)
    task = LanguageModeling(uri)
    dataset = TokenDataset(uri, "train", prefetch=prefetch)
    batches = ShardedBatches(dataset, GlobalOrder(dataset.rows_per_shard, t.seed), t.global_batch_size,
                             t.micro_batch_size, 0, 1)
    model = archs.build(job.model)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, t.betas)
    moe = job.model.moe
    layout = (job.model.moe_layer_ids, moe.num_experts)
    t0 = time.perf_counter()
    for step in range(steps):
        train_step(model, task, batches.batches_for_step(step * t.global_batch_size), optimizer,
                   DynamicLossScaler(enabled=False), "fp32", torch.device("cpu"), t.grad_clip, layout)
    seconds = time.perf_counter() - t0
    dataset.close()
    return {"tokens_per_s": steps * t.global_batch_size * dataset.seq_len / seconds,
            "stalls_after_first": dataset.stats.stalls - 1, "wait_s": dataset.stats.wait_s,
            "shards_read": dataset.stats.shard_reads}


def main(argv=None, from_cli: bool = False) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench storage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--steps", type=int, default=10, help="training steps per run (default: 10)")
    p.add_argument("--rows-per-shard", type=int, default=32,
                   help="rows per shard: small, so a short run crosses shards (default: 32 = 2 steps of moe_small)")
    p.add_argument("--documents", type=int, default=60,
                   help="pydoc topics in the dataset (default: 60, about 20 train shards)")
    p.add_argument("--startup-shards", type=int, default=300,
                   help="about this many shards in the dataset whose opening is timed (driver vs worker checks; "
                        "default: 300, 0 skips)")
    p.add_argument("--latency-ms", type=float, default=20.0,
                   help="time to first byte added to each request while opening it (default: 20, an object "
                        "store's; moto alone answers in a few ms, one request at a time)")
    p.add_argument("--parts", nargs="+", choices=("train", "startup", "checkpoint"),
                   default=["train", "startup", "checkpoint"],
                   help="what to measure: shard reads and training, the opening of a many-shard dataset, "
                        "checkpoint loads from the bucket (default: all three)")
    p.add_argument("--config", default="moe_small",
                   help="model/batch config trained (default: moe_small; moe_debug for a quick look on a busy CPU)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.rows_per_shard < 1:
        p.error("--repeats, --steps and --rows-per-shard must be >= 1")
    torch.set_num_threads(args.threads)

    from cluster.config.job import load_config
    from cluster.data.prepare import load_documents
    from cluster.data.tokenizer import ByteTokenizer
    from cluster.data.tokens import write_dataset

    server, endpoint = start_s3_server()
    # Fake credentials for the local server only; the storage layer reads them from here.
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true")
    try:
        import pyarrow.fs as pafs

        host = endpoint.split("://", 1)[1]
        pafs.S3FileSystem(endpoint_override=host, scheme="http", allow_bucket_creation=True).create_dir(BUCKET)
        job = load_config(args.config, [])
        seq_len = job.data.seq_len
        docs, described = load_documents(["pydoc"])
        docs = docs[: args.documents]
        with tempfile.TemporaryDirectory(prefix="raymoe-bench-storage-") as tmp:
            sources = {"disk": str(Path(tmp) / "pydoc"), "s3": f"s3://{BUCKET}/pydoc"}
            for uri in sources.values():
                meta = write_dataset(docs, uri, ByteTokenizer(), seq_len, rows_per_shard=args.rows_per_shard,
                                     source=described)
            print(f"[bench storage] dataset: {meta.num_train} train rows of {seq_len + 1} tokens in "
                  f"{len(meta.shards['train'])} shards, on disk and in s3://{BUCKET} ({endpoint})", flush=True)
            startup = None
            if args.startup_shards and "startup" in args.parts:
                # Rows of 17 tokens, 2 per shard: the footers, not the bytes, are what is timed.
                rng = random.Random(0)  # a document of 8 words is about 3 rows of 17 bytes
                words = [" ".join(rng.choice(("expert", "router", "token", "shard")) for _ in range(8))
                         for _ in range(args.startup_shards)]
                many = f"s3://{BUCKET}/many-shards"
                big = write_dataset(words, many, ByteTokenizer(), 16, rows_per_shard=3, source="words")
                n = len(big.shards["train"]) + len(big.shards["val"])
                with latency_proxy(endpoint, args.latency_ms) as reads_at:
                    os.environ["AWS_ENDPOINT_URL"] = reads_at
                    try:
                        startup = {"shards": n, "latency_ms": args.latency_ms,
                                   "seconds": startup_checks(many, args.repeats)}
                    finally:
                        os.environ["AWS_ENDPOINT_URL"] = endpoint
                print(f"[bench storage] opening a dataset of {n} shards in s3://{BUCKET} (+{args.latency_ms:g} ms "
                      "per request): " + ", ".join(f"{k} {v:.2f} s" for k, v in startup["seconds"].items()), flush=True)
            job = load_config(args.config, [f"data.path={sources['disk']}"])
            from cluster.train.driver import resolve

            job = resolve(job)
            reads = {k: [] for k in sources}
            runs = {(k, pf): [] for k in sources for pf in (True, False)}
            ckpt = None
            if "checkpoint" in args.parts:
                with latency_proxy(endpoint, args.latency_ms) as reads_at:
                    try:
                        ckpt = checkpoint_loads(job, f"s3://{BUCKET}/ckpt", args.repeats, reads_at)
                    finally:
                        os.environ["AWS_ENDPOINT_URL"] = endpoint
                print(f"[bench storage] {args.config} checkpoint from s3://{BUCKET} (+{args.latency_ms:g} ms per "
                      "request): " + ", ".join(f"{k} {v['seconds']:.2f} s" for k, v in ckpt["ways"].items()), flush=True)
            for rnd in range(args.repeats if "train" in args.parts else 0):
                for name, uri in sources.items():
                    r = read_throughput(uri)
                    reads[name].append(r)
                    print(f"[bench storage] round {rnd + 1}: read {name:4s} {r['mb_per_s']:7.1f} MB/s", flush=True)
                for (name, pf) in runs:
                    r = train_run(job, sources[name], pf, args.steps)
                    runs[(name, pf)].append(r)
                    print(f"[bench storage] round {rnd + 1}: train {name:4s} prefetch {'on ' if pf else 'off'} "
                          f"{r['tokens_per_s']:7.0f} tok/s, {r['stalls_after_first']} stalls after the first shard, "
                          f"waited {r['wait_s']:.2f} s", flush=True)
    finally:
        server.kill()
        server.wait()

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    table = []
    if "train" in args.parts:
        disk_on = med(runs[("disk", True)], "tokens_per_s")
        table = [{"source": name, "prefetch": pf, "tokens_per_s": med(rs, "tokens_per_s"),
                  "vs_disk_prefetch": med(rs, "tokens_per_s") / disk_on - 1,
                  "stalls_after_first_shard": med(rs, "stalls_after_first"), "wait_s": med(rs, "wait_s")}
                 for (name, pf), rs in runs.items()]
        print(f"\nshard read (all {len(meta.shards['train'])} train shards, median of {args.repeats}):")
        for name, rs in reads.items():
            print(f"  {name:4s} {med(rs, 'mb_per_s'):8.1f} MB/s")
        print(f"\n{args.config} training, {args.steps} steps x {job.train.global_batch_size} x {seq_len} tokens, fp32 CPU, "
              f"{args.threads} threads (median of {args.repeats} interleaved runs):")
        print(f"  {'source':6s} {'prefetch':8s} {'tok/s':>8s} {'vs disk+prefetch':>17s} {'stalls after 1st':>17s} {'wait s':>7s}")
        for r in table:
            print(f"  {r['source']:6s} {'on' if r['prefetch'] else 'off':8s} {r['tokens_per_s']:8.0f} "
                  f"{100 * r['vs_disk_prefetch']:+16.1f}% {r['stalls_after_first_shard']:17.0f} {r['wait_s']:7.2f}")
    if startup:
        print(f"\nopening a dataset of {startup['shards']} shards in the bucket, +{args.latency_ms:g} ms per request "
              f"(median of {args.repeats}; the driver checks every footer once, each worker only lists, then checks "
              "each shard as it reads it):")
        for k, v in startup["seconds"].items():
            print(f"  {k:26s} {v:7.2f} s")
    if ckpt:
        print(f"\nloading {args.config} + AdamW state ({ckpt['shard_bytes'] / 2**20:.1f} MiB of shards) from the "
              f"bucket, +{args.latency_ms:g} ms per request (median of {args.repeats}):")
        print(f"  {'way':36s} {'seconds':>8s} {'MiB read':>9s} {'GETs':>6s}")
        for k, v in ckpt["ways"].items():
            print(f"  {k:36s} {v['seconds']:8.2f} {v['bytes'] / 2**20:9.1f} {v['requests'] or '-':>6}")
    result = {"checkpoint": ckpt, "startup": startup, "reads": {k: {"mb_per_s_median": med(v, "mb_per_s"), "runs": v} for k, v in reads.items() if v},
              "training": table, "runs": {f"{k}-{'prefetch' if pf else 'no-prefetch'}": v for (k, pf), v in runs.items()},
              "steps": args.steps, "rows_per_shard": args.rows_per_shard, "repeats": args.repeats,
              "threads": args.threads, "config": args.config, "endpoint": "moto server on 127.0.0.1"}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
