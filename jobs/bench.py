"""Benchmarks that print figures and write JSON (never run as tests).

  python -m jobs.bench moe                       # MoE layer fwd+bwd vs dense SwiGLU, every backend, fp32 CPU
  python -m jobs.bench moe --device cuda --dtype bf16 --out gpu.json   # the layer alone on a GPU, pure bf16
  python -m jobs.bench gpu --out DIR             # the prepared GPU check, one GPU, no Ray (cluster/bench/gpu.py)
  python -m jobs.bench moe --breakdown           # where the time goes (router, permutation, matmul, combine)
  python -m jobs.bench moe --pieces              # the same by wall clock: each piece's fwd+bwd timed apart, and dense's
  python -m jobs.bench moe --compile             # also each backend with its SwiGLU compiled (what train.compile does)
  python -m jobs.bench kernels                   # grouped_mm alone, every backend vs one dense matmul
  python -m jobs.bench ep                        # MoE layer with EP=2 on 2 gloo workers vs one process
  python -m jobs.bench overhead --quick          # jobs.train vs plain torch loops, per-phase breakdown (cluster/bench/overhead.py)
  python -m jobs.bench overhead --repeats 3 --compile   # interleaved rounds, medians, and train.compile as (d)
  python -m jobs.bench overhead --ray-plain      # also (e): the plain DDP loop inside Ray Train workers (Ray's own cost)
  python -m jobs.bench metrics                   # step time of the moe_small model with and without metrics
  python -m jobs.bench archs [--quick]           # the architecture families side by side (cluster/bench/archs.py)
  python -m jobs.bench parallel                  # every 2-rank layout (dp, ep, tp, pp) of the small models (cluster/bench/parallel.py)
  python -m jobs.bench deploy --out FILE         # sizes, perplexity, ONNX Runtime latency, generation (cluster/bench/deploy.py)
  python -m jobs.bench hf                        # HF import/export seconds + peak memory, training vs transformers (cluster/bench/hf.py)
  python -m jobs.bench tasks [--quick]           # forecasters (hybrid vs plain) and image-text fusion variants (cluster/bench/tasks.py)
  python -m jobs.bench data [--sizes 200MB]      # data preparation on Ray Data, 1 vs 2 CPUs, vs one process (cluster/bench/data.py)
  python -m jobs.bench claims --measure [--quick]  # the seed's claims no other benchmark measures (cluster/bench/seed_claims.py)
  python -m jobs.bench claims --out docs/claims.md # the claims report from every benchmark's JSON (cluster/bench/claims.py)
  python -m jobs.bench storage                   # training data from an S3 API vs disk, prefetch on/off (cluster/bench/storage.py)

The MoE layer's whole expert path is timed (router, permutation, grouped SwiGLU, weighted
combine, balancing losses), against a dense SwiGLU FFN with hidden = top_k x expert_hidden:
the same matmul FLOPs per token.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cluster.bench.moe import DTYPES, SHAPES, bench_ep, bench_kernels, bench_metrics, bench_moe, breakdown, pieces
from cluster.train import malloc


def print_table(results: list[dict]) -> None:
    print(f"\n{'shape':22s} {'backend':20s} {'ms':>8s} {'rows/s':>10s} {'GFLOP/s':>8s} {'vs dense':>8s}")
    for r in results:
        print(f"{r['shape']:22s} {r['backend']:20s} {r['seconds'] * 1e3:8.1f} {r['tokens_per_s']:10.0f} "
              f"{r['gflops']:8.1f} {r['ratio_to_dense']:8.2f}")
    if any("ratio_range" in r for r in results):
        print("vs dense: the median of the interleaved rounds' ratios (each round times dense and every backend once)")


SUBCOMMANDS = {"archs": "cluster.bench.archs", "parallel": "cluster.bench.parallel", "deploy": "cluster.bench.deploy",
               "tasks": "cluster.bench.tasks", "gpu": "cluster.bench.gpu", "data": "cluster.bench.data",
               "claims": "cluster.bench.claims", "hf": "cluster.bench.hf", "overhead": "cluster.bench.overhead",
               "storage": "cluster.bench.storage"}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] and args[0] in SUBCOMMANDS:  # benchmarks with their own options live in their own module
        import importlib

        return importlib.import_module(SUBCOMMANDS[args[0]]).main(args[1:], from_cli=argv is None)
    p = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["moe", "kernels", "ep", "metrics"],
                   help="the MoE layer, grouped_mm alone, or the layer under expert parallelism")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--backends", nargs="+", default=None, help="default: every backend available here")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--ep-chunks", type=int, nargs="+", default=[1, 4],
                   help="ep: the parallel.ep_overlap_chunks values to time (1 = one exchange, no overlap)")
    p.add_argument("--breakdown", action="store_true", help="profile and show where the time goes")
    p.add_argument("--pieces", action="store_true",
                   help="moe: time each piece of the layer (router, permutation, GEMMs, SwiGLU, combine) and of "
                        "the dense SwiGLU apart, by wall clock")
    p.add_argument("--compile", action="store_true",
                   help="moe: also time each backend with its SwiGLU compiled (what train.compile does to MoE layers)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default malloc (see cluster/train/malloc.py; default: the caching settings)")
    args = p.parse_args(argv)
    if not args.system_malloc and argv is None:
        malloc.reexec_with_caching_malloc("jobs.bench")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.breakdown:
        breakdown(args)
        return 0
    if args.pieces:
        write_results(args, pieces(args))
        return 0
    threads = 1 if args.what == "ep" else torch.get_num_threads()
    print(f"{args.what} forward+backward, {args.device} {args.dtype}, {threads} thread(s) per process, "
          f"median of {args.repeats}, {'caching' if malloc.active() else 'system'} malloc", file=sys.stderr)
    results = {"moe": bench_moe, "kernels": bench_kernels, "ep": bench_ep, "metrics": bench_metrics}[args.what](args)
    if args.what == "metrics":
        for r in results:
            print(f"{r['name']:16s} {r['seconds'] * 1e3:8.1f} ms/step")
        print(f"the log() call itself: {results[1]['log_call_ms']:.3f} ms/step")
        print(f"metrics cost: {results[1]['overhead_ms']:+.2f} ms/step "
              f"({100 * results[1]['overhead_ms'] / 1e3 / results[0]['seconds']:+.2f}%, median of {args.repeats})")
    elif args.what == "ep":
        print(f"\n{'case':18s} {'ms':>8s} {'tokens/s/worker':>16s} {'exchange':>9s} {'hidden':>7s} {'vs chunks 1':>11s}")
        for r in results:
            extra = (f" {100 * r['hidden']:6.1f}% {r['speedup_vs_chunks1']:10.3f}x" if "hidden" in r else "")
            print(f"{r['name']:18s} {r['seconds'] * 1e3:8.1f} {r['tokens_per_s']:16.0f} {100 * r['exchange_share']:8.1f}%"
                  + extra)
        print("exchange: share of the step spent in (blocked on) the exchanges; hidden: the part of the "
              "one-exchange time the overlap hid (gloo's copies share the 2 cores with the compute)")
    else:
        print_table(results)
    write_results(args, results)
    return 0


def write_results(args, results) -> None:
    """The results and the settings they were measured with, as JSON at --out (if given)."""
    if args.out:
        meta = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "caching_malloc": malloc.active()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
