"""Benchmarks that print figures and write JSON (never run as tests).

  python -m jobs.bench moe                       # MoE layer fwd+bwd vs dense SwiGLU, every backend, fp32 CPU
  python -m jobs.bench moe --device cuda --dtype bf16 --out gpu.json   # the prepared GPU check
  python -m jobs.bench moe --breakdown           # where the time goes (router, permutation, matmul, combine)
  python -m jobs.bench kernels                   # grouped_mm alone, every backend vs one dense matmul
  python -m jobs.bench ep                        # MoE layer with EP=2 on 2 gloo workers vs one process
  python -m jobs.bench metrics                   # step time of the moe_small model with and without metrics
  python -m jobs.bench archs [--quick]           # the architecture families side by side (jobs/bench_archs.py)
  python -m jobs.bench parallel                  # every 2-rank layout (dp, ep, tp, pp) of the small models (jobs/bench_parallel.py)
  python -m jobs.bench deploy --out FILE         # sizes, perplexity, ONNX Runtime latency, generation (jobs/bench_deploy.py)
  python -m jobs.bench tasks [--quick]           # forecasters (hybrid vs plain) and image-text fusion variants (jobs/bench_tasks.py)

The MoE layer's whole expert path is timed (router, permutation, grouped SwiGLU, weighted
combine, balancing losses), against a dense SwiGLU FFN with hidden = top_k x expert_hidden:
the same matmul FLOPs per token.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from archs.common import SwiGLU
from cluster import malloc
from kernels import BackendUnavailable, available_backends
from moe.config import MoEConfig
from moe.layer import MoELayer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {
    "coarse": dict(tokens=8192, d_model=512, num_experts=8, top_k=2, expert_hidden=1024),
    "fine": dict(tokens=8192, d_model=512, num_experts=64, top_k=8, expert_hidden=256),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median seconds of forward + backward (+ zeroing grads)."""
    times = []
    for i in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        x.grad = None
        _sync(x.device)
        t0 = time.perf_counter()
        module(x).float().square().mean().backward()
        _sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_moe(shape: dict, backend: str, device, dtype) -> MoELayer:
    cfg = MoEConfig(num_experts=shape["num_experts"], top_k=shape["top_k"], expert_hidden=shape["expert_hidden"],
                    capacity_factor=None, backend=backend)
    layer = MoELayer(shape["d_model"], cfg)
    layer.init_weights(0.02, 0.02)
    return layer.to(device=device, dtype=dtype).train()


def bench_moe(args) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    backends = args.backends or available_backends(device, dtype)
    results = []
    for name in args.shapes:
        shape = SHAPES[name]
        torch.manual_seed(0)
        x = torch.randn(1, shape["tokens"], shape["d_model"], device=device, dtype=dtype, requires_grad=True)
        dense = SwiGLU(shape["d_model"], shape["top_k"] * shape["expert_hidden"]).to(device=device, dtype=dtype)
        dense_s = time_fwd_bwd(dense, x, args.repeats, args.warmup)
        flops = 3 * 2 * 3 * shape["tokens"] * shape["d_model"] * shape["top_k"] * shape["expert_hidden"]
        results.append(dict(shape=name, backend="dense", seconds=dense_s, tokens_per_s=shape["tokens"] / dense_s,
                            gflops=flops / dense_s / 1e9, ratio_to_dense=1.0, **shape))
        for backend in backends:
            try:
                layer = build_moe(shape, backend, device, dtype)
                s = time_fwd_bwd(layer, x, args.repeats, args.warmup)
            except (BackendUnavailable, ValueError, RuntimeError) as e:
                print(f"  {name:7s} {backend:12s} skipped: {e}", file=sys.stderr)
                continue
            results.append(dict(shape=name, backend=backend, seconds=s, tokens_per_s=shape["tokens"] / s,
                                gflops=flops / s / 1e9, ratio_to_dense=dense_s / s, **shape))
            print(f"  {name:7s} {backend:12s} {s * 1e3:8.1f} ms", file=sys.stderr, flush=True)
    return results


def breakdown(args) -> None:
    """Profile one fwd+bwd per shape with the chosen backend; group self CPU time by stage."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    stages = {"matmul": ("grouped_mm", "mm", "bmm", "addmm", "matmul"),
              "permutation/combine": ("index", "gather", "scatter", "index_add", "sort", "argsort", "bincount", "cat"),
              "elementwise": ("silu", "mul", "add", "sigmoid", "softmax", "log", "sum", "mean", "clamp", "div")}
    for name in args.shapes:
        shape = SHAPES[name]
        layer = build_moe(shape, (args.backends or ["auto"])[0], device, dtype)
        x = torch.randn(1, shape["tokens"], shape["d_model"], device=device, dtype=dtype, requires_grad=True)
        time_fwd_bwd(layer, x, 1, 1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            layer(x).float().square().mean().backward()
        totals: dict[str, float] = {}
        for ev in prof.key_averages():
            key = ev.key.lower().replace("aten::", "")
            stage = next((s for s, names in stages.items() if any(key == n or key.startswith(n + "_") or
                                                                   key.startswith("_" + n) for n in names)), "other")
            totals[stage] = totals.get(stage, 0.0) + ev.self_cpu_time_total / 1e3
        total = sum(totals.values())
        print(f"\n{name}: self CPU time by stage ({total:.0f} ms total)")
        for stage, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {stage:22s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


EP_SHAPE = dict(tokens=8192, d_model=512, num_experts=8, top_k=2, expert_hidden=1024)


def _ep_worker(rank: int, world: int, port: int, args, out: str) -> None:
    """One of `world` gloo ranks: time the EP layer fwd+bwd and the exchange inside it."""
    import os

    import torch.distributed as dist

    from parallel.expert_parallel import ExchangeTimer, apply_expert_parallel
    from parallel.mesh import ParallelDims, build_groups

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    s = EP_SHAPE
    torch.manual_seed(0)
    layer = build_moe(s, "auto", "cpu", torch.float32)
    apply_expert_parallel(layer, build_groups(ParallelDims.build(world, world, s["num_experts"]), rank))
    timer = ExchangeTimer()
    layer.dispatcher.timer = timer
    torch.manual_seed(1 + rank)  # each rank its own tokens
    x = torch.randn(1, s["tokens"], s["d_model"], requires_grad=True)
    time_fwd_bwd(layer, x, 1, 1)  # warm-up
    timer.seconds = 0.0
    total = time_fwd_bwd(layer, x, args.repeats, 0) * args.repeats  # median x n ~ the timed span
    torch.save({"seconds": total / args.repeats, "exchange": timer.seconds / args.repeats}, f"{out}/rank{rank}.pt")
    del layer
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_ep(args) -> list[dict]:
    """EP=2 on 2 gloo processes (1 thread each) vs the unsharded layer on one process (1 thread),
    both with 8192 tokens per worker. The exchange share counts the counts and token exchanges
    of dispatch and combine, forward and backward."""
    import tempfile

    import torch.multiprocessing as mp

    s, world = EP_SHAPE, 2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    single = build_moe(s, "auto", "cpu", torch.float32)
    x = torch.randn(1, s["tokens"], s["d_model"], requires_grad=True)
    single_s = time_fwd_bwd(single, x, args.repeats, args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_ep_worker, args=(world, _free_port(), args, tmp), nprocs=world, start_method="spawn")
        ranks = [torch.load(f"{tmp}/rank{r}.pt", weights_only=True) for r in range(world)]
    ep_s = max(r["seconds"] for r in ranks)
    exchange = max(r["exchange"] for r in ranks)
    common = dict(shape="T=8192/worker d=512 E=8 k=2 F=1024", ratio_to_dense=None, gflops=None)
    return [
        dict(name="single_process", backend="local", seconds=single_s, tokens_per_s=s["tokens"] / single_s,
             exchange_share=0.0, **common),
        dict(name="ep2_gloo", backend="all_to_all", seconds=ep_s, tokens_per_s=s["tokens"] / ep_s,
             exchange_share=exchange / ep_s, exchange_s=exchange, **common),
    ]


def bench_metrics(args) -> list[dict]:
    """Optimizer steps of the `moe_small` model (8 x 256 tokens per step, fp32) with and without
    the metrics path (statistics summary, JSON line, Prometheus gauges incl. per-expert series)."""
    import tempfile

    import numpy as np

    import archs
    from cluster.amp import DynamicLossScaler
    from cluster.config import MetricsConfig, load_config
    from cluster.metrics import build_metrics
    from cluster.optim import build_optimizer
    from cluster.step import train_step
    from cluster.tasks import LanguageModeling

    class _ArrayLM(LanguageModeling):
        def __init__(self):
            pass

    cfg = load_config("moe_small").model
    cfg = dataclasses.replace(cfg, vocab_size=257)  # fields only (not e.g. MoEOptions._n_slots)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 257, size=(8, 257), dtype=np.int64)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, on in (("without_metrics", False), ("with_metrics", True)):
            torch.manual_seed(0)
            model = archs.build(cfg)
            opt = build_optimizer(model, 1e-3, 0.0, (0.9, 0.95))
            logger = build_metrics(MetricsConfig(), f"bench-{name}", Path(tmp) / name, Path(tmp), 0) if on else None
            times, log_times = [], []
            for i in range(args.warmup + args.repeats):
                t0 = time.perf_counter()
                r = train_step(model, _ArrayLM(), [batch], opt, DynamicLossScaler(False), "fp32", torch.device("cpu"), 1.0,
                               (cfg.moe_layer_ids, cfg.moe.num_experts))
                t_log = time.perf_counter()
                if logger is not None:
                    logger.log({"loss": r.loss, "grad_norm": r.grad_norm, "aux_loss": r.aux_loss, "lr": 1e-3,
                                "tokens_per_s": 1.0, "step_time_s": 1.0, "mfu": 0.1, "loss_scale": 1.0,
                                "moe": r.moe["layers"]}, i)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
                    log_times.append(time.perf_counter() - t_log)
            if logger is not None:
                logger.close()
            sec = statistics.median(times)
            results.append(dict(name=name, shape="moe_small, 8 x 256 tokens", backend="auto", seconds=sec,
                                tokens_per_s=8 * 256 / sec, gflops=None, ratio_to_dense=None,
                                log_call_ms=statistics.median(log_times) * 1e3))
    results[1]["overhead_ms"] = (results[1]["seconds"] - results[0]["seconds"]) * 1e3
    return results


KERNEL_SHAPES = ((16384, 8, 512, 2048), (65536, 64, 512, 512))  # (rows N, groups G, d_in, d_out)


def bench_kernels(args) -> list[dict]:
    """grouped_mm fwd+bwd per backend (and torch's built-in backward) vs one dense x @ w[0]."""
    import kernels
    from kernels import grouped

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    results = []
    for N, G, I, O in KERNEL_SHAPES:
        sizes = torch.bincount(torch.randint(G, (N,), generator=gen), minlength=G).to(device)
        x = torch.randn(N, I, generator=gen).to(device, dtype).requires_grad_()
        w = (torch.randn(G, I, O, generator=gen) / I ** 0.5).to(device, dtype).requires_grad_()
        cases = {name: (lambda n: lambda: kernels.grouped_mm(x, w, sizes, n))(name)
                 for name in args.backends or kernels.available_backends(device, dtype)}
        if "grouped" in cases:
            cases["grouped_builtin_bwd"] = lambda: grouped.grouped_mm_builtin(x, w, sizes)
        cases["dense"] = lambda: x @ w[0]
        flops = 3 * 2 * N * I * O
        for name, fn in cases.items():
            times = []
            for i in range(args.warmup + args.repeats):
                x.grad = w.grad = None
                _sync(device)
                t0 = time.perf_counter()
                fn().float().sum().backward()
                _sync(device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            sec = statistics.median(times)
            results.append(dict(shape=f"N={N} G={G} {I}x{O}", backend=name, seconds=sec,
                                tokens_per_s=N / sec, gflops=flops / sec / 1e9, ratio_to_dense=None))
        dense = results[-1]["seconds"]
        for r in results[-len(cases):]:
            r["ratio_to_dense"] = dense / r["seconds"]
    return results


def print_table(results: list[dict]) -> None:
    print(f"\n{'shape':22s} {'backend':20s} {'ms':>8s} {'rows/s':>10s} {'GFLOP/s':>8s} {'vs dense':>8s}")
    for r in results:
        print(f"{r['shape']:22s} {r['backend']:20s} {r['seconds'] * 1e3:8.1f} {r['tokens_per_s']:10.0f} "
              f"{r['gflops']:8.1f} {r['ratio_to_dense']:8.2f}")


SUBCOMMANDS = {"archs": "jobs.bench_archs", "parallel": "jobs.bench_parallel", "deploy": "jobs.bench_deploy",
               "tasks": "jobs.bench_tasks"}


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
    p.add_argument("--breakdown", action="store_true", help="profile and show where the time goes")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default malloc (see cluster/malloc.py; default: the caching settings)")
    args = p.parse_args(argv)
    if not args.system_malloc and argv is None:
        malloc.reexec_with_caching_malloc("jobs.bench")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.breakdown:
        breakdown(args)
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
        print(f"\n{'case':16s} {'ms':>8s} {'tokens/s/worker':>16s} {'exchange':>9s}")
        for r in results:
            print(f"{r['name']:16s} {r['seconds'] * 1e3:8.1f} {r['tokens_per_s']:16.0f} {100 * r['exchange_share']:8.1f}%")
    else:
        print_table(results)
    if args.out:
        meta = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "caching_malloc": malloc.active()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
