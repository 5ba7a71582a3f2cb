"""Every 2-rank layout of the `small` dense and MoE models: tokens/s, peak memory per worker, loss match.

  python -m jobs.bench parallel                    # dense + MoE, every 2-rank layout, 4 timed steps each
  python -m jobs.bench parallel --models small --steps 2 --out parallel.json

Each layout runs as 2 spawned gloo processes (1 thread each, CPU fp32) training the same steps on
the same global batch as one process (1 thread); "loss diff" is the largest per-step difference from
it. Peak memory is each worker's peak resident set (VmHWM, reset before the model is built), and
"model MiB" the part of it above the process's footprint at that moment (weights, gradients,
optimizer state, activations, communication buffers; an allocator artefact can make it read lower
for a larger model). CPU only.

Model state per worker ("state MiB", FSDP rows): the bytes of parameters, gradients and AdamW
state this worker holds, counted from the tensors after a step (a DTensor counts its local shard;
gradients as the parameters they belong to, since a step ends with them freed), and "live MiB" the
peak of live tensor bytes during one timed step, from the dispatch-mode recorder the architecture
benchmark uses (cluster/bench/archs.py LiveBytes). "x state" is the state bytes relative to the
single process. FSDP throughput against DDP: `--repeats N` runs dp2 and fsdp2 interleaved N times
and reports the median ratio of their tokens/s.

Pipeline bubble: with p stages and m micro-batches per step, GPipe and 1F1B idle (p-1)/(m+p-1) of
the step (1F1B only holds fewer activations), interleaved 1F1B with v stages per rank
(p-1)/(v*m+p-1). The measured figure is 1 - (one process's step time / p) / (pipeline step time):
everything that keeps the pipeline from a perfect p-fold speedup (bubble, stage imbalance from the
embedding and head at the ends, send/recv), so it is an upper bound on the bubble itself.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cluster.train import malloc
from cluster.tasks.lm import LanguageModeling

MODELS = {"small": "default", "moe_small": "moe_small"}  # name -> job config holding the `small` preset
LAYOUTS = [  # (name, parallel settings); ep only for MoE models; world 2 unless given
    ("dp2", dict()),
    ("fsdp2", dict(fsdp=True)),
    ("dp2_ep2", dict(ep=2)),
    ("fsdp2_ep2", dict(ep=2, fsdp=True)),
    ("dp4_ep2", dict(ep=2, world=4)),  # EP=2 x EDP=2
    ("fsdp4_ep2", dict(ep=2, world=4, fsdp=True)),
    ("tp2", dict(tp=2)),
    ("pp2_gpipe", dict(pp=2, schedule="gpipe")),
    ("pp2_1f1b", dict(pp=2, schedule="1f1b")),
    ("pp2_interleaved", dict(pp=2, schedule="interleaved_1f1b")),
]


def expected_bubble(layout: dict, microbatches: int) -> float | None:
    p = layout.get("pp", 1)
    if p == 1:
        return None
    v = 2 if layout.get("schedule") == "interleaved_1f1b" else 1
    return (p - 1) / (v * microbatches + p - 1)


def _model_cfg(name: str):
    import dataclasses

    from cluster.config.job import load_config
    return dataclasses.replace(load_config(MODELS[name]).model, vocab_size=257)


def _data(steps: int, rows: int, seq: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 257, size=(rows, seq + 1), dtype=np.int64) for _ in range(steps)]


class _ArrayLM(LanguageModeling):
    """Language modelling on in-memory token arrays (the task's own loss code)."""

    def __init__(self):  # no dataset on disk
        pass


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process; ru_maxrss would carry the parent's peak over exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    try:  # Linux: "5" resets the peak resident set (VmHWM) to the current one
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _train(par_or_model, cfg, data, micro_rows, dp_rank, dp, warmup) -> tuple[list[float], list[float], float]:
    """Per step: the global loss and the step's wall time."""
    from cluster.train.precision import DynamicLossScaler
    from cluster.train.optim import build_optimizer
    from cluster.train.step import train_step

    model = getattr(par_or_model, "model", par_or_model)
    opt = build_optimizer(model, 1e-3, 0.0, (0.9, 0.95))
    if model is not par_or_model:
        par_or_model.prepare_optimizer(opt)
    moe = getattr(cfg, "moe", None)
    layout = (cfg.moe_layer_ids, moe.num_experts) if moe is not None else None
    from cluster.bench.archs import LiveBytes
    from parallel.fsdp import sharded_bytes

    losses, times, live = [], [], 0
    for step, batch in enumerate(data):
        share = np.array_split(batch, dp)[dp_rank]
        mbs = [share[i:i + micro_rows] for i in range(0, len(share), micro_rows)]
        record = step == warmup  # one timed step under the recorder (it slows every op: not timed)
        t0 = time.perf_counter()
        with (LiveBytes() if record else contextlib.nullcontext()) as rec:
            r = train_step(par_or_model, _ArrayLM(), mbs, opt, DynamicLossScaler(False), "fp32", torch.device("cpu"),
                           1.0, layout)
        if record:
            live = rec.peak
        else:
            times.append(time.perf_counter() - t0)
        losses.append(r.loss)
    state = sharded_bytes(model, opt)
    state["grads"] = state["params"]  # each parameter's gradient is the size of what it holds
    _train.last = {"state_bytes": sum(state.values()), "state": state, "live_bytes": live}
    return losses, times[warmup:] if len(times) > warmup else times


def _worker(rank: int, world: int, rdzv: str, cfg, layout: dict, args, out: str) -> None:
    import torch.distributed as dist

    import archs
    import parallel
    from cluster.config.job import num_experts
    from parallel.local_group import init_local_gloo
    from parallel.mesh import ParallelDims, build_groups

    init_local_gloo(rank, world, rdzv, timeout_s=1800)
    torch.set_num_threads(1)
    _reset_peak()
    base = _status_mib("VmRSS")
    dims = ParallelDims.build(world, layout.get("ep", 1), num_experts(cfg), tp=layout.get("tp", 1),
                              pp=layout.get("pp", 1), model_cfg=cfg)
    groups = build_groups(dims, rank)
    torch.manual_seed(0)
    par = parallel.apply(archs.build(cfg), groups, torch.device("cpu"), schedule=layout.get("schedule", "1f1b"),
                         fsdp=layout.get("fsdp", False))
    data = _data(args.warmup + 1 + args.steps, args.batch, args.seq_len)
    losses, times = _train(par, cfg, data, args.micro_batch, dims.coords(rank)[1], dims.dp, args.warmup)
    peak = _status_mib("VmHWM")
    torch.save({"losses": losses, "seconds": statistics.median(times), "peak_mib": peak, "model_mib": peak - base,
                **_train.last}, f"{out}/rank{rank}.pt")
    del par
    dist.destroy_process_group()



def run(args) -> list[dict]:
    import archs

    torch.set_num_threads(1)
    tokens = args.batch * args.seq_len
    results = []
    for name in args.models:
        cfg = _model_cfg(name)
        torch.manual_seed(0)
        _reset_peak()
        before = _status_mib("VmRSS")
        data = _data(args.warmup + 1 + args.steps, args.batch, args.seq_len)
        ref_losses, ref_times = _train(archs.build(cfg), cfg, data, args.micro_batch, 0, 1, args.warmup)
        single = _train.last
        single_s = statistics.median(ref_times)
        results.append(dict(model=name, layout="single_process", world=1, tokens_per_s=tokens / single_s,
                            seconds=single_s, peak_mib=[_status_mib("VmHWM")], model_mib=[_status_mib("VmHWM") - before],
                            loss_diff=0.0, expected_bubble=None, measured_bubble=None, state_bytes=[single["state_bytes"]],
                            state=[single["state"]], live_bytes=[single["live_bytes"]], state_ratio=1.0))
        _print_row(results[-1])
        for layout_name, layout in LAYOUTS:
            if "ep" in layout and getattr(cfg, "moe", None) is None:
                continue
            if args.layouts and layout_name not in args.layouts:
                continue
            world = layout.get("world", 2)
            if args.batch % (world * args.micro_batch):
                continue
            ranks = _spawn(world, cfg, layout, args, f"{name} {layout_name}")
            seconds = max(r["seconds"] for r in ranks)
            p = layout.get("pp", 1)
            micro = args.batch // args.micro_batch  # pipeline layouts here have dp = 1
            results.append(dict(
                model=name, layout=layout_name, world=world, tokens_per_s=tokens / seconds, seconds=seconds,
                state_bytes=[r["state_bytes"] for r in ranks], state=[r["state"] for r in ranks],
                live_bytes=[r["live_bytes"] for r in ranks],
                state_ratio=max(r["state_bytes"] for r in ranks) / single["state_bytes"],
                peak_mib=[r["peak_mib"] for r in ranks], model_mib=[r["model_mib"] for r in ranks],
                loss_diff=float(max(abs(a - b) for a, b in zip(ranks[0]["losses"], ref_losses))),
                expected_bubble=expected_bubble(layout, micro),
                measured_bubble=1 - (single_s / p) / seconds if p > 1 else None))
            _print_row(results[-1])
        if args.repeats:
            results.append(_interleaved(cfg, name, args, tokens))
    return results


def _spawn(world: int, cfg, layout: dict, args, what: str) -> list[dict]:
    """One layout's `world` ranks; their results. A rank can die as gloo tears down ("terminate
    called without an active exception", seen in 2 of this machine's first full runs): if every
    rank had saved its results they are used, else the layout runs once more; both said on stderr."""
    import torch.multiprocessing as mp

    from parallel.local_group import new_rendezvous

    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            files = [Path(f"{tmp}/rank{r}.pt") for r in range(world)]
            try:
                mp.start_processes(_worker, args=(world, new_rendezvous(tmp), cfg, layout, args, tmp), nprocs=world,
                                   start_method="spawn")
            except mp.ProcessExitedException as err:
                if not all(f.exists() for f in files):
                    if attempt == 2:
                        raise
                    print(f"[bench] {what}: a rank died ({err}) before saving: running it again",
                          file=sys.stderr, flush=True)
                    continue
                print(f"[bench] {what}: a rank died ({err}) after every rank saved its results: using them",
                      file=sys.stderr, flush=True)
            return [torch.load(f, weights_only=True) for f in files]
    raise AssertionError("unreachable")


def _interleaved(cfg, name: str, args, tokens: int) -> dict:
    """dp2 and fsdp2 alternately `args.repeats` times: the median ratio of FSDP's tokens/s to DDP's."""
    ratios = []
    for i in range(args.repeats):
        seconds = {}
        for layout_name, layout in (("dp2", {}), ("fsdp2", {"fsdp": True})):
            seconds[layout_name] = max(r["seconds"] for r in _spawn(2, cfg, layout, args, f"{name} {layout_name}"))
        ratios.append(seconds["dp2"] / seconds["fsdp2"])
        print(f"{name:10s} interleaved run {i + 1}: fsdp2 / dp2 tokens/s = {ratios[-1]:.3f}", flush=True)
    return dict(model=name, layout="fsdp2_vs_dp2_interleaved", ratios=ratios, median_ratio=statistics.median(ratios))


def _print_row(r: dict) -> None:
    bubble = (f"{100 * r['expected_bubble']:5.1f}% / {100 * r['measured_bubble']:5.1f}%"
              if r["expected_bubble"] is not None else "")
    state = f"{max(r['state_bytes']) / 2 ** 20:8.1f} {r['state_ratio']:5.2f}x {max(r['live_bytes']) / 2 ** 20:8.1f}"
    print(f"{r['model']:10s} {r['layout']:16s} {r['tokens_per_s']:9.0f} {r['seconds'] * 1e3:9.0f} "
          f"{' / '.join(f'{m:5.0f}' for m in r['peak_mib']):>13s} {' / '.join(f'{m:5.0f}' for m in r['model_mib']):>13s} "
          f"{state} {r['loss_diff']:9.1e}  {bubble}", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.bench parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--steps", type=int, default=4, help="timed steps per layout (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (global batch)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layouts", nargs="+", choices=[n for n, _ in LAYOUTS], default=None,
                   help="only these layouts (default: all; the single process always runs)")
    p.add_argument("--repeats", type=int, default=0,
                   help="also run dp2 and fsdp2 interleaved this many times (median FSDP/DDP throughput ratio)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.batch % (2 * args.micro_batch):
        p.error(f"--batch {args.batch} must be a multiple of 2 x --micro-batch")
    return args


def main(argv: list[str] | None = None, from_cli: bool = False) -> int:
    """`argv`: the arguments after `parallel`; `from_cli`: restart with the caching malloc settings."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if from_cli:
        malloc.reexec_with_caching_malloc("jobs.bench")
    print(f"parallel layouts: {', '.join(args.models)}, {args.batch} x {args.seq_len} tokens/step, micro-batch "
          f"{args.micro_batch}, {args.steps} timed steps, fp32 cpu, 1 thread per process, "
          f"{'caching' if malloc.active() else 'system'} malloc", file=sys.stderr, flush=True)
    print(f"{'model':10s} {'layout':16s} {'tokens/s':>9s} {'ms/step':>9s} {'peak MiB/rk':>13s} {'model MiB/rk':>13s} "
          f"{'state MiB':>8s} {'x state':>6s} {'live MiB':>8s} {'loss diff':>9s}  bubble expected / measured")
    results = run(args)
    if args.out:
        meta = {"device": "cpu", "dtype": "fp32", "threads_per_process": 1, "torch": torch.__version__,
                "caching_malloc": malloc.active(), **{k: v for k, v in vars(args).items() if k != "out"}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {args.out}")
    print(f"{len(results)} runs; the loss diff is against one process on the same global batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
