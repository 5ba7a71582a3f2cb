"""The MoE layer, grouped_mm, expert parallelism and the metrics path, timed (`python -m jobs.bench moe|kernels|ep|metrics`).

The MoE layer's whole expert path is timed (router, permutation, grouped SwiGLU, weighted
combine, balancing losses), against a dense SwiGLU FFN with hidden = top_k x expert_hidden:
the same matmul FLOPs per token.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from archs.common import SwiGLU
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
    """Every variant and the dense layer timed in interleaved rounds (dense, v1, v2, ..., dense,
    v1, ...: one fwd+bwd each per round), so the machine's drift hits all alike; the median
    seconds of each and the median of the rounds' ratios to dense."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    backends = args.backends or available_backends(device, dtype)
    results = []
    for name in args.shapes:
        shape = SHAPES[name]
        torch.manual_seed(0)
        x = torch.randn(1, shape["tokens"], shape["d_model"], device=device, dtype=dtype, requires_grad=True)
        dense = SwiGLU(shape["d_model"], shape["top_k"] * shape["expert_hidden"]).to(device=device, dtype=dtype)
        flops = 3 * 2 * 3 * shape["tokens"] * shape["d_model"] * shape["top_k"] * shape["expert_hidden"]
        modules, extras = {"dense": dense}, {"dense": {}}
        variants = [(b, False) for b in backends] + ([(b, True) for b in backends] if getattr(args, "compile", False) else [])
        for backend, compiled in variants:
            label = backend + ("+compiled-act" if compiled else "")
            try:
                layer = build_moe(shape, backend, device, dtype)
                if compiled:
                    layer.experts.compile_activation()
                    extras[label] = {"max_diff_vs_eager": _compiled_vs_eager(shape, backend, x, layer)}
                else:
                    extras[label] = {}
                time_fwd_bwd(layer, x, 1, args.warmup)  # warm-up (and a backend that cannot run fails here)
            except (BackendUnavailable, ValueError, RuntimeError) as e:
                print(f"  {name:7s} {label:12s} skipped: {e}", file=sys.stderr)
                extras.pop(label, None)
                continue
            modules[label] = layer
        time_fwd_bwd(dense, x, 1, args.warmup)
        times = {label: [] for label in modules}
        for _ in range(args.repeats):
            for label, module in modules.items():
                times[label].append(time_fwd_bwd(module, x, 1, 0))
        for label in modules:
            s = statistics.median(times[label])
            ratios = [d / t for d, t in zip(times["dense"], times[label])]
            ratio = statistics.median(ratios)
            results.append(dict(shape=name, backend=label, seconds=s, tokens_per_s=shape["tokens"] / s,
                                gflops=flops / s / 1e9, ratio_to_dense=ratio,
                                ratio_range=[min(ratios), max(ratios)],
                                **shape, **extras[label]))
            extra = extras[label]
            print(f"  {name:7s} {label:24s} {s * 1e3:8.1f} ms, {ratio:.2f}x dense"
                  + (f" (output and input gradient within {extra['max_diff_vs_eager']:.1e} of eager)" if extra else ""),
                  file=sys.stderr, flush=True)
    return results


def _compiled_vs_eager(shape: dict, backend: str, x: torch.Tensor, compiled: MoELayer) -> float:
    """Largest difference of the layer's output and input gradient, compiled SwiGLU against eager
    (same weights); also the first, compiling call."""
    eager = build_moe(shape, backend, x.device, x.dtype)
    eager.load_state_dict(compiled.state_dict())
    results = []
    for layer in (eager, compiled):
        xi = x.detach().clone().requires_grad_(True)
        y = layer(xi)
        y.float().square().mean().backward()
        results.append((y.detach(), xi.grad))
    compiled.zero_grad(set_to_none=True)
    return max(float((a - b).abs().max()) for a, b in zip(*results))


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


def pieces(args) -> list[dict]:
    """Wall-clock forward+backward of each piece of the MoE layer timed apart, on the inputs the
    layer gives it, beside the dense SwiGLU's own pieces: where the layer loses against dense
    (the profiler's per-op self times inflate small elementwise ops several-fold on this CPU).
    Each piece's backward gets a fixed random output gradient (no extra reduction timed)."""
    from cluster.bench.gpu import timed
    from kernels import grouped_mm
    from moe.dispatcher import keep_order, sum_by_token
    from moe.experts import swiglu, swiglu_ops
    from moe.losses import router_losses

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    reps, warm = args.repeats, args.warmup
    results = []
    for name in args.shapes:
        sh = SHAPES[name]
        N, C, E, K, F = sh["tokens"], sh["d_model"], sh["num_experts"], sh["top_k"], sh["expert_hidden"]
        torch.manual_seed(0)
        layer = build_moe(sh, (args.backends or ["auto"])[0], device, dtype)
        backend = layer.experts.choice(device, dtype).backend
        x = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
        dense = SwiGLU(C, K * F).to(device=device, dtype=dtype)
        with torch.no_grad():
            routing = layer.router(x)
            order, sizes = keep_order(routing, None, "score")
            token_M, weight_M = routing.token_A[order], routing.weight_A[order]
        M = token_M.numel()
        xm = torch.randn(M, C, device=device, dtype=dtype, requires_grad=True)
        h = torch.randn(M, 2 * F, device=device, dtype=dtype, requires_grad=True)
        a = torch.randn(M, F, device=device, dtype=dtype, requires_grad=True)
        w = weight_M.clone().requires_grad_(True)
        y = torch.randn(M, C, device=device, dtype=dtype, requires_grad=True)
        hd = torch.randn(N, 2 * K * F, device=device, dtype=dtype, requires_grad=True)
        ad = torch.randn(N, K * F, device=device, dtype=dtype, requires_grad=True)
        g = {shape: torch.randn(shape, device=device, dtype=dtype) for shape in
             ((N, C), (M, C), (M, 2 * F), (M, F), (N, K * F), (N, 2 * K * F))}

        def router():
            r = layer.router(x)
            losses = router_losses(r, layer.cfg, N)
            torch.autograd.backward([r.weight_A, losses["total"]], [torch.ones_like(r.weight_A), torch.ones_like(losses["total"])])

        compiled = torch.compile(swiglu_ops, dynamic=True)
        moe_pieces = {
            "router (gate, softmax, top-k, counts, balancing losses)": router,
            "permutation (sort, index_select of k copies; backward index_add)":
                lambda: (x.index_select(0, routing.token_A[keep_order(routing, None, "score")[0]])).backward(g[(M, C)]),
            "grouped GEMM x -> [gate|up] (6 of the 3 x 2 FLOPs: 2/3)":
                lambda: grouped_mm(xm, layer.experts.w13, sizes, backend).backward(g[(M, 2 * F)]),
            "SwiGLU with the routing weight, eager": lambda: swiglu(h, w).backward(g[(M, F)]),
            "SwiGLU with the routing weight, compiled": lambda: compiled(h, w).backward(g[(M, F)]),
            "grouped GEMM hidden -> out (1/3)": lambda: grouped_mm(a, layer.experts.w2, sizes, backend).backward(g[(M, C)]),
            "combine (index_add by token; backward index_select)": lambda: sum_by_token(y, token_M, N, dtype).backward(g[(N, C)]),
        }
        dense_pieces = {
            "dense GEMMs x -> [w1|w3] (2/3)": lambda: torch.cat([dense.w1(x), dense.w3(x)], 1).backward(g[(N, 2 * K * F)]),
            "dense SwiGLU (silu * up), eager": lambda: swiglu(hd).backward(g[(N, K * F)]),
            "dense GEMM hidden -> out (1/3)": lambda: dense.w2(ad).backward(g[(N, C)]),
        }
        whole = {"MoE layer, whole (eager)": lambda: layer(x[None]).backward(g[(N, C)][None]),
                 "dense SwiGLU, whole": lambda: dense(x).backward(g[(N, C)])}
        print(f"\n{name}: {N} tokens, d {C}, E {E}, k {K}, F {F}, backend {backend}, {M} token copies; "
              f"fwd+bwd wall ms, median of {reps}", flush=True)
        row = {}
        for label, fn in {**whole, **moe_pieces, **dense_pieces}.items():
            for t in (x, xm, h, a, w, y, hd, ad):
                t.grad = None
            layer.zero_grad(set_to_none=True)
            dense.zero_grad(set_to_none=True)
            row[label] = timed(fn, device, reps, warm)
            print(f"  {label:70s} {row[label] * 1e3:8.1f}", flush=True)
        moe_sum = sum(v for k, v in row.items() if k in moe_pieces and "compiled" not in k)
        floor = sum(v for k, v in row.items() if k in moe_pieces and ("GEMM" in k or "permutation" in k or "combine" in k))
        dense_whole = row["dense SwiGLU, whole"]
        print(f"  sum of the MoE pieces (eager SwiGLU) {moe_sum * 1e3:.1f} ms; GEMMs + permutation + combine alone "
              f"{floor * 1e3:.1f} ms = {dense_whole / floor:.2f}x dense's whole layer ({dense_whole * 1e3:.1f} ms): "
              "no routing or activation cost could lift the layer above that", flush=True)
        results.append(dict(shape=name, backend=backend, pieces_s=row, moe_pieces_sum_s=moe_sum,
                            gemm_permute_combine_s=floor, dense_s=dense_whole, ceiling_ratio=dense_whole / floor, **sh))
    return results


EP_SHAPE = dict(tokens=8192, d_model=512, num_experts=8, top_k=2, expert_hidden=1024)


def _ep_worker(rank: int, world: int, rdzv: str, args, out: str) -> None:
    """One of `world` gloo ranks: time the EP layer fwd+bwd and the exchange inside it."""
    import torch.distributed as dist

    from parallel.expert_parallel import ExchangeTimer, apply_expert_parallel
    from parallel.local_group import init_local_gloo
    from parallel.mesh import ParallelDims, build_groups

    init_local_gloo(rank, world, rdzv, timeout_s=1800)
    torch.set_num_threads(1)
    s = EP_SHAPE
    torch.manual_seed(0)
    layer = build_moe(s, "auto", "cpu", torch.float32)
    groups = build_groups(ParallelDims.build(world, world, s["num_experts"]), rank)
    layers = {}
    for chunks in args.ep_chunks:
        torch.manual_seed(0)
        layers[chunks] = apply_expert_parallel(build_moe(s, "auto", "cpu", torch.float32), groups, overlap_chunks=chunks)
        layers[chunks].dispatcher.timer = ExchangeTimer()
    torch.manual_seed(1 + rank)  # each rank its own tokens
    x = torch.randn(1, s["tokens"], s["d_model"], requires_grad=True)
    result = {c: {"seconds": [], "exchange": []} for c in args.ep_chunks}
    for c, layer in layers.items():
        time_fwd_bwd(layer, x, 1, 1)  # warm-up
    # Interleaved rounds (the machine is shared: load drifts), one fwd+bwd per chunk count per round.
    for _ in range(args.repeats):
        for c, layer in layers.items():
            layer.dispatcher.timer.seconds = 0.0
            result[c]["seconds"].append(time_fwd_bwd(layer, x, 1, 0))
            result[c]["exchange"].append(layer.dispatcher.timer.seconds)
    torch.save({c: {k: statistics.median(v) for k, v in r.items()} for c, r in result.items()}, f"{out}/rank{rank}.pt")
    del layers
    dist.destroy_process_group()



def bench_ep(args) -> list[dict]:
    """EP=2 on 2 gloo processes (1 thread each) vs the unsharded layer on one process (1 thread),
    both with 8192 tokens per worker. The exchange share counts the counts and token exchanges
    of dispatch and combine, forward and backward: with `--ep-chunks` K > 1 (the overlapped
    exchange, parallel.ep_overlap_chunks) only the time spent blocked waiting for them (what the
    overlap did not hide). `hidden` = 1 - visible(K) / exchange(1)."""
    import tempfile

    import torch.multiprocessing as mp

    from parallel.local_group import new_rendezvous

    s, world = EP_SHAPE, 2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    single = build_moe(s, "auto", "cpu", torch.float32)
    x = torch.randn(1, s["tokens"], s["d_model"], requires_grad=True)
    single_s = time_fwd_bwd(single, x, args.repeats, args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_ep_worker, args=(world, new_rendezvous(tmp), args, tmp), nprocs=world, start_method="spawn")
        ranks = [torch.load(f"{tmp}/rank{r}.pt", weights_only=True) for r in range(world)]
    common = dict(shape="T=8192/worker d=512 E=8 k=2 F=1024", ratio_to_dense=None, gflops=None)
    results = [dict(name="single_process", backend="local", seconds=single_s, tokens_per_s=s["tokens"] / single_s,
                    exchange_share=0.0, **common)]
    base = None
    for c in args.ep_chunks:
        ep_s = max(r[c]["seconds"] for r in ranks)
        exchange = max(r[c]["exchange"] for r in ranks)
        row = dict(name="ep2_gloo" if c == 1 else f"ep2_gloo_chunks{c}", backend="all_to_all", chunks=c,
                   seconds=ep_s, tokens_per_s=s["tokens"] / ep_s, exchange_share=exchange / ep_s, exchange_s=exchange,
                   **common)
        if c == 1:
            base = row
        elif base is not None:
            row["hidden"] = 1 - exchange / base["exchange_s"]
            row["speedup_vs_chunks1"] = base["seconds"] / ep_s
        results.append(row)
    return results


def bench_metrics(args) -> list[dict]:
    """Optimizer steps of the `moe_small` model (8 x 256 tokens per step, fp32) with and without
    the metrics path (statistics summary, JSON line, Prometheus gauges incl. per-expert series)."""
    import tempfile

    import numpy as np

    import archs
    from cluster.train.precision import DynamicLossScaler
    from cluster.config.job import MetricsConfig, load_config
    from cluster.train.metrics import build_metrics
    from cluster.train.optim import build_optimizer
    from cluster.train.step import train_step
    from cluster.tasks.lm import LanguageModeling

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
