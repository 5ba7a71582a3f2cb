"""`python -m jobs.bench overhead`: what `jobs.train` costs over a plain torch loop, and where.

The default job's model (built from its config) trained three ways on the same global batch
(random tokens of the job's sequence length; AdamW, gradient clipping, the job's micro-batches):
  (a) a plain single-process torch loop, 2 threads;
  (b) a plain 2-process DDP script over gloo, 1 thread each (no Ray, no raymoe loop);
  (c) `python -m jobs.train` on 2 Ray workers (a short run, no evaluation until the end);
  (d) with `--compile`: (c) with `train.compile=true` (regional torch.compile of each block);
  (e) with `--ray-plain`: (b)'s plain loop and DDP inside 2 Ray Train workers (a fresh embedded
      Ray, TorchTrainer, gloo, 1 thread each; no raymoe loop): (c) against (e) is raymoe's loop,
      (e) against (b) is what Ray's own processes cost on the same cores.
tokens/s over the steps after the first logging window (warm-up), and (c)'s per-phase
breakdown from the loop's own host timers (`phase_s` in metrics.jsonl). All ways run with the
caching malloc settings jobs.train gives its CPU workers (cluster/train/malloc.py), so the
comparison is of the loops, not of the allocators. `--repeats N` runs the
ways interleaved N times (a, b, c[, d], a, b, ...: the machine's drift hits each alike) and
reports the median of each way's tokens/s and of each round's ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PHASES = ("data", "forward_backward", "grad_reduce", "optimizer", "moe_statistics", "loss_sync", "metrics",
          "progress", "eval", "checkpoint")


def _setup(config: str):
    import dataclasses

    import archs
    from cluster.config.job import load_config
    from cluster.data.tokenizer import ByteTokenizer

    job = load_config(config)
    if job.model.vocab_size is None:  # the job takes it from the data; the plain loops need no data
        job = dataclasses.replace(job, model=dataclasses.replace(job.model, vocab_size=ByteTokenizer.vocab_size))
    return job, archs.build(job.model)


def _plain_loop(job, model, steps: int, warmup: int, rank: int = 0, world: int = 1) -> float:
    """Seconds per step after `warmup` steps: this rank's share of the global batch, micro-batched."""
    import torch.nn.functional as F

    from cluster.train.optim import build_optimizer

    t = job.train
    opt = build_optimizer(model, t.lr, t.weight_decay, t.betas)
    rng = np.random.default_rng(rank)
    rows, T, vocab = t.global_batch_size // world, job.data.seq_len, job.model.vocab_size
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = torch.from_numpy(rng.integers(0, vocab, size=(rows, T + 1), dtype=np.int64))
        micro = [batch[i:i + t.micro_batch_size] for i in range(0, rows, t.micro_batch_size)]
        for i, mb in enumerate(micro):
            sync = model.no_sync() if world > 1 and i < len(micro) - 1 else _null()
            with sync:
                logits = model(mb[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb[:, 1:].reshape(-1)) / len(micro)
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.mean(times))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _plain_ddp_seconds(config: str, steps: int, warmup: int) -> float:
    """(b)'s loop on this rank of an initialised gloo group: 1 thread, the model under DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    job, model = _setup(config)
    return _plain_loop(job, DistributedDataParallel(model), steps, warmup, dist.get_rank(), dist.get_world_size())


def _ddp_worker(rank: int, world: int, rdzv: str, config: str, steps: int, warmup: int, out: str) -> None:
    import torch.distributed as dist

    from parallel.local_group import init_local_gloo

    init_local_gloo(rank, world, rdzv, timeout_s=1800)
    sec = _plain_ddp_seconds(config, steps, warmup)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"seconds": sec}))
    dist.destroy_process_group()


def _ray_plain_ddp(config: str, steps: int, warmup: int, out: str) -> None:
    """(e): seconds per step of (b)'s plain DDP loop run by 2 Ray Train workers, in a fresh
    embedded Ray started by this (child) process, the workers' environment as jobs.train gives it;
    rank 0 writes them to `out` (one node: a local path)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.train.malloc import CACHING_MALLOC_ENV

    def loop(cfg):
        import torch.distributed as dist

        sec = _plain_ddp_seconds(cfg["config"], cfg["steps"], cfg["warmup"])
        if dist.get_rank() == 0:  # DDP keeps the ranks in step
            Path(cfg["out"]).write_text(json.dumps({"seconds": sec}))

    ray.init(num_cpus=2, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": dict(CACHING_MALLOC_ENV)})
    with tempfile.TemporaryDirectory() as tmp:
        TorchTrainer(loop, train_loop_config={"config": config, "steps": steps, "warmup": warmup, "out": out},
                     torch_config=TorchConfig(backend="gloo"),
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name="ray_plain", storage_path=tmp)).fit()
    ray.shutdown()


def _cpu_snapshot() -> tuple[float, dict]:
    """(time, {pid: (label, cpu seconds)}) of every process this user can read."""
    import psutil

    procs = {}
    for q in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        try:
            ct = q.info["cpu_times"]
            label = (" ".join(q.info["cmdline"] or []) or q.info["name"] or "?")[:60].strip()
            procs[q.info["pid"]] = (label, ct.user + ct.system)
        except Exception:  # noqa: BLE001 - a process that ended or hides its times
            continue
    return time.time(), procs


def _cpu_shares(a: tuple[float, dict], b: tuple[float, dict]) -> dict:
    """CPU used between two snapshots, in cores: the Train workers, everything else, the top others."""
    dt = b[0] - a[0]
    used = [(cpu - a[1][pid][1], label) for pid, (label, cpu) in b[1].items() if pid in a[1]]
    workers = sum(u for u, label in used if "RayTrainWorker" in label)
    others = sorted(((u, label) for u, label in used if "RayTrainWorker" not in label and u > 0), reverse=True)
    return {"window_s": dt, "workers_cores": workers / dt, "others_cores": sum(u for u, _ in others) / dt,
            "top_others": [(label, u / dt) for u, label in others[:8]]}


def _raymoe_run(config: str, steps: int, window: int, tmp: str, compile_: bool = False) -> tuple[float, dict, dict, dict]:
    """tokens/s and mean phase seconds of the last logging window of a short `jobs.train` run, its
    loss per step, and the CPU each process used over that window (snapshots taken when the
    window's metrics line appears, polled every 0.5 s: nothing sampled during the window)."""
    name = "overhead"
    cmd = [sys.executable, "-m", "jobs.train", "--config", config, "--name", name,
           "--set", f"train.compile={str(compile_).lower()}",
           "--set", f"train.steps={steps}", "--set", f"train.log_interval={window}",
           "--set", "train.eval_interval=0", "--set", "train.eval_sequences=8",
           "--set", f"train.checkpoint_interval={steps}", "--set", f"train.warmup_steps={min(steps, 20)}",
           "--set", f"cluster.storage_path={tmp}"]
    proc = subprocess.Popen(cmd)
    metrics, snaps = Path(tmp, name, "metrics.jsonl"), {}
    while proc.poll() is None:
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                r = json.loads(line) if line.strip() else {}
                if "phase_s" in r and r["step"] not in snaps:
                    snaps[r["step"]] = _cpu_snapshot()
        time.sleep(0.5)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    last = [r for r in records if "phase_s" in r][-1]
    marks = sorted(snaps)
    shares = _cpu_shares(snaps[marks[-2]], snaps[marks[-1]]) if len(marks) >= 2 else {}
    return last["tokens_per_s"], last["phase_s"], {r["step"]: r["loss"] for r in records if "loss" in r}, shares


WAYS = {"a": "plain_single_2threads", "b": "plain_ddp_gloo_2x1", "c": "jobs_train_2_workers",
        "d": "jobs_train_2_workers_compiled", "e": "plain_ddp_in_ray_train_2x1"}


def _one_round(args, job, tokens: int, warmup: int, ways: str) -> tuple[dict, dict, dict]:
    """tokens/s of each way in `ways`, (c)'s phase seconds, and (with (d)) the largest per-step loss
    difference of (d) against (c): over the first 10 steps ("10") and over all ("all")."""
    import torch.multiprocessing as mp

    import archs
    from parallel.local_group import new_rendezvous

    tok_s, phases, losses, loss_diff, shares = {}, {}, {}, {}, {}
    if "a" in ways:
        print("[overhead] (a) plain single-process loop, 2 threads", file=sys.stderr, flush=True)
        torch.set_num_threads(2)
        torch.manual_seed(0)
        tok_s["a"] = tokens / _plain_loop(job, archs.build(job.model), args.steps, warmup)
    if "b" in ways:
        print("[overhead] (b) plain 2-process DDP over gloo, 1 thread each", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_ddp_worker, args=(2, new_rendezvous(tmp), args.config, args.steps, warmup, tmp), nprocs=2,
                               start_method="spawn")
            tok_s["b"] = tokens / max(json.loads(Path(tmp, f"rank{r}.json").read_text())["seconds"] for r in range(2))
    for way, compiled in (("c", False), ("d", True)):
        if way in ways:
            print(f"[overhead] ({way}) jobs.train on 2 Ray workers{', train.compile=true' if compiled else ''}",
                  file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                tok_s[way], ph, losses[way], cpu = _raymoe_run(args.config, args.steps, args.window, tmp, compiled)
            if way == "c":
                phases, shares = ph, cpu
    if "e" in ways:
        print("[overhead] (e) the plain DDP loop in 2 Ray Train workers", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:  # a child process: its own embedded Ray, shut down after
            out = Path(tmp, "e.json")
            subprocess.run([sys.executable, "-c", "import sys; from cluster.bench.overhead import _ray_plain_ddp; "
                            "_ray_plain_ddp(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])",
                            args.config, str(args.steps), str(warmup), str(out)], check=True)
            tok_s["e"] = tokens / json.loads(out.read_text())["seconds"]
    if "d" in losses:  # the same seed, data and steps: compiled and eager must train alike
        diff = {s: abs(losses["d"][s] - losses["c"][s]) for s in losses["c"]}
        loss_diff = {"10": max(v for s, v in diff.items() if s <= 10), "all": max(diff.values())}
    return tok_s, phases, loss_diff, shares


def main(argv=None, from_cli: bool = False) -> int:
    import statistics

    p = argparse.ArgumentParser(prog="python -m jobs.bench overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="the job config whose model is trained (default: default)")
    p.add_argument("--steps", type=int, default=60, help="steps of each run (the first --window are warm-up)")
    p.add_argument("--window", type=int, default=20, help="steps per logging window; the last one is timed")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds of every way (medians reported)")
    p.add_argument("--compile", action="store_true", help="also (d): jobs.train with train.compile=true")
    p.add_argument("--ray-plain", action="store_true",
                   help="also (e): the plain DDP loop of (b) inside 2 Ray Train workers (what Ray itself costs)")
    p.add_argument("--quick", action="store_true", help="20 steps, windows of 10 (a smoke run)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.window = 20, 10
    if args.steps < 2 * args.window:
        p.error("--steps must be at least 2 x --window (one window of warm-up, one timed)")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if from_cli:  # (a) and (b) (children of this process) get the allocator the Ray workers of (c) get
        from cluster.train import malloc

        malloc.reexec_with_caching_malloc("jobs.bench")

    warmup = args.steps - args.window
    job, model = _setup(args.config)
    tokens = job.train.global_batch_size * job.data.seq_len
    ways = "abc" + ("d" if args.compile else "") + ("e" if args.ray_plain else "")
    print(f"[overhead] {args.config}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{tokens} tokens/step, timing the last {args.window} of {args.steps} steps, "
          f"{args.repeats} interleaved round(s) of ({', '.join(ways)})", file=sys.stderr)
    del model
    rounds, phase_rounds, diff_rounds, share_rounds = [], [], [], []
    for i in range(args.repeats):
        tok_s, phases, loss_diff, shares = _one_round(args, job, tokens, warmup, ways)
        share_rounds.append(shares)
        rounds.append(tok_s)
        phase_rounds.append(phases)
        diff_rounds.append(loss_diff)
        print(f"[overhead] round {i + 1}/{args.repeats}: " + ", ".join(f"({w}) {tok_s[w]:.0f}" for w in ways)
              + f" tok/s; (c)/(a) {tok_s['c'] / tok_s['a']:.3f}x, (c)/(b) {tok_s['c'] / tok_s['b']:.3f}x",
              file=sys.stderr, flush=True)
    median = {w: statistics.median(r[w] for r in rounds) for w in ways}
    ratios = {f"{w}/{ref}": statistics.median(r[w] / r[ref] for r in rounds)
              for w in ways if w in "cd" for ref in "ab"}
    if "e" in ways:  # (c)/(e): raymoe's loop against the same plain loop on Ray; (e)/(b): Ray's processes
        ratios.update({k: statistics.median(r[k[0]] / r[k[2]] for r in rounds) for k in ("c/e", "e/b")})
    if "d" in ways:
        ratios["d/c"] = statistics.median(r["d"] / r["c"] for r in rounds)
        print(f"(d) against (c), largest per-step loss difference over the first 10 steps: "
              f"{max(d['10'] for d in diff_rounds):.1e}, over all {args.steps}: "
              f"{max(d['all'] for d in diff_rounds):.1e} (inductor-compiled blocks vs eager; in an MoE model "
              "a last-bit difference can flip a near-tied top-k choice, and the runs then part)")
    phases = {k: statistics.median(ph[k] for ph in phase_rounds) for k in phase_rounds[0]}
    spread = (f", range over {args.repeats} rounds in brackets" if args.repeats > 1 else "")
    print(f"\n{'run':30s} {'tokens/s':>10s}   (median{spread})")
    for w in ways:
        lo, hi = min(r[w] for r in rounds), max(r[w] for r in rounds)
        print(f"({w}) {WAYS[w]:26s} {median[w]:10.0f}" + (f"   [{lo:.0f} - {hi:.0f}]" if args.repeats > 1 else ""))
    print("\nratios (median of the rounds' ratios): " + ", ".join(f"({k}) {v:.3f}x" for k, v in ratios.items()))
    step_s = tokens / median["c"]
    print(f"\n(c) per phase, median seconds per step (host timers; {step_s * 1e3:.0f} ms/step in all):")
    for name in PHASES:
        if name in phases:
            print(f"  {name:18s} {phases[name] * 1e3:8.1f} ms  {100 * phases[name] / step_s:5.1f}%")
    print("  (DDP's all-reduce runs inside forward_backward: it overlaps the backward)")
    shares = [sh for sh in share_rounds if sh]
    if shares:
        print(f"\n(c) CPU over the timed window, in cores of this machine's {os.cpu_count()} (per round): "
              + "; ".join(f"the 2 Train workers {sh['workers_cores']:.2f}, every other process {sh['others_cores']:.2f}"
                          for sh in shares))
        print("  most busy others (last round): " + ", ".join(f"{label.split(' (')[0]} {c:.3f}" for label, c in shares[-1]["top_others"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "tokens_per_s": {WAYS[w]: median[w] for w in ways}, "ratios": ratios, "phase_s": phases,
            "rounds": [{WAYS[w]: r[w] for w in ways} for r in rounds], "steps": args.steps, "window": args.window,
            "compiled_vs_eager_loss_diff": max((d["all"] for d in diff_rounds if d), default=None),
            "compiled_vs_eager_loss_diff_10_steps": max((d["10"] for d in diff_rounds if d), default=None),
            "cpu_shares_c": share_rounds, "repeats": args.repeats, "config": args.config}, indent=1))
        print(f"wrote {args.out}")
    return 0
