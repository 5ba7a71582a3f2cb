"""The per-worker training loop that Ray Train runs on every worker.

Read top to bottom: set up the device and model, resume from Ray's latest checkpoint if there
is one, then step -> log -> evaluate -> checkpoint until the run (or this launch) is done.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import torch

import archs
import parallel
from cluster import checkpoint
from cluster.config.job import JobConfig
from cluster.data import storage
from cluster.tasks.registry import build_task
from cluster.train.metrics import build_metrics, measure_peak_flops, peak_flops
from cluster.train.optim import build_optimizer, build_scheduler
from cluster.train.precision import DynamicLossScaler, kernel_report
from cluster.train.step import evaluate_task, train_step
from parallel.mesh import build_groups


def train_loop_per_worker(loop_config: dict) -> None:
    _quiet_ray_train_reports()
    job: JobConfig = loop_config["job"]
    run_dir = storage.locate(loop_config["run_dir"])  # a shared path or a URI
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t, c = job.train, job.cluster
    if c.use_gpu:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(c.num_threads or max(1, int(c.cpus_per_worker)))

    dims = job.parallel_dims(world)
    groups = build_groups(dims, rank)
    _, dp_rank, _ = dims.coords(rank)
    # The model is initialised identically on every rank from the seed (no broadcast needed).
    torch.manual_seed(t.seed)
    task = build_task(t.task, job.data, t, verify="listing")  # the driver checked every footer
    # Every rank of a data-parallel replica (its TP ranks and pipeline stages) reads its data.
    batches = task.train_batches(t.global_batch_size, t.micro_batch_size, dp_rank, dims.dp, t.seed)
    eval_set = task.eval_batches(t.eval_sequences, t.micro_batch_size, dp_rank, dims.dp)
    p = job.parallel
    # FSDP (without TP/PP): the model is traced on the meta device and each rank materialises only
    # its shards after sharding (parallel/meta_init.py); the values equal the ordinary build's.
    meta_init = bool(p.fsdp) and p.fsdp_meta_init and dims.tp == 1 and dims.pp == 1 and dims.dp > 1
    if meta_init:
        from parallel.meta_init import expert_place, materialize, trace_build

        rng = torch.get_rng_state()
        trace = trace_build(lambda: archs.build(job.model))
        model = trace.model
    else:
        model = archs.build(job.model).to(device)
    flops_per_token = model.flops_per_token(batches.dataset.seq_len)  # the whole model, before it is cut
    # tensor -> pipeline -> expert -> activation checkpointing -> compile -> FSDP / data parallel (parallel/__init__.py)
    par = parallel.apply(model, groups, device, schedule=p.schedule, microbatches=p.microbatches,
                         pp_split=p.pp_split, activation_checkpointing=t.activation_checkpointing,
                         fsdp=p.fsdp, reshard_after_forward=p.fsdp_reshard_after_forward, precision=t.precision,
                         ep_overlap_chunks=p.ep_overlap_chunks, compile=t.compile)
    if meta_init:
        materialize(trace, par.model, rng, expert_place(par.model), device)
    model = par.model  # this rank's share: what the optimizer steps and checkpoints hold
    optimizer = par.prepare_optimizer(build_optimizer(model, t.lr, t.weight_decay, t.betas))
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
    scaler = DynamicLossScaler(enabled=t.precision == "fp16")

    step = 0
    resumed = ray.train.get_checkpoint()
    # Checked where it is stored (a shared path or the bucket): Ray's latest, or an older intact
    # one if that one is damaged; with none registered, the run's newest intact one (a group that
    # failed right after a save may restart before Ray registered it).
    # Every rank at once: they verify the checkpoint between them (each hashes 1/world of its files)
    # and agree; then each reads only its own part of it, from disk or by range from the bucket.
    latest = run_dir.join(Path(resumed.path).name) if resumed is not None else None
    ckpt_dir = checkpoint.choose_resume(latest, run_dir)
    state = None
    if ckpt_dir is not None:
        state = checkpoint.load(ckpt_dir, model, optimizer, job.model, rank, world)
    if state is not None:
        step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if rank == 0:
            print(f"[raymoe] resumed from step {step} ({ckpt_dir.name}) on {world} workers", flush=True)
    else:
        # Per data-parallel rank stream for dropout/jitter after the shared init: TP ranks must
        # draw the same (they compute on the same tokens), pipeline stages may.
        torch.manual_seed(t.seed + 1 + dp_rank)

    log = build_metrics(job.metrics, c.run_name, run_dir, storage.locate(loop_config["storage"]), rank)
    kernel_lines, kernel_record = kernel_report(model, t.precision, device)  # which MoE kernel runs, once
    if rank == 0 and kernel_lines:
        print("\n".join(kernel_lines), flush=True)
    if kernel_record:
        log.log(kernel_record, step)
    reads = batches.dataset.stats if hasattr(batches.dataset, "stats") else None
    wait_seen = 0.0  # seconds waited for data up to the last logging window
    # MFU against the peak (datasheet, configured, or measured where none is known) and, as a
    # separate series, against a matmul measured here ("achievable"); rank 0 only logs.
    peak = peak_flops(device, job.metrics.peak_flops) if rank == 0 else None
    achievable = (peak.flops if peak.basis == "measured" else measure_peak_flops(device)) if rank == 0 else 0.0
    if peak is not None:
        print(f"[raymoe] MFU denominator: {peak.flops / 1e12:.3g} TFLOP/s per worker, {peak.basis}: {peak.what}",
              flush=True)
    stop = t.stop_at_step or t.steps
    tokens_per_step = t.global_batch_size * batches.dataset.seq_len

    def run_eval() -> dict:
        metrics = evaluate_task(par, task, eval_set, t.precision, device)
        log.log(metrics, step)
        return metrics

    log.log({"event": "launch_start", "resumed_from": step, "world_size": world,
             "nodes": _node_of_each_rank(world), "layout": dataclasses.asdict(dims),
             **({"peak_flops": peak.flops, "peak_basis": peak.basis, "peak_source": peak.what,
                 "achievable_flops": achievable} if peak else {})}, step)
    pace = loop_config.get("pace_file")
    last_eval = run_eval() if step == 0 else {}
    start_step, t_start = step, time.perf_counter()
    window_t, window_steps = time.perf_counter(), 0
    phase_s: dict[str, float] = {}  # host seconds per phase over the logging window (see StepResult.phases)

    def spent(name: str, since: float) -> float:
        now = time.perf_counter()
        phase_s[name] = phase_s.get(name, 0.0) + now - since
        return now

    while step < stop:
        t_phase = time.perf_counter()
        micro_batches = batches.batches_for_step(step * t.global_batch_size)
        spent("data", t_phase)
        result = train_step(par, task, micro_batches, optimizer, scaler, t.precision, device, t.grad_clip)
        for name, sec in result.phases.items():
            phase_s[name] = phase_s.get(name, 0.0) + sec
        scheduler.step()
        step += 1
        if pace:
            _pace(pace)
        window_steps += 1
        record = {"step": step, "loss": result.loss, "grad_norm": result.grad_norm,
                  "lr": scheduler.get_last_lr()[0], "skipped": result.skipped, "samples": step * t.global_batch_size}
        record["loss_scale"] = scaler.scale  # 1.0 unless fp16
        if result.aux_loss is not None:
            record["aux_loss"] = result.aux_loss
        log_now = step % t.log_interval == 0 or step == stop
        if log_now:  # window figures and MoE statistics once per logging interval
            elapsed = time.perf_counter() - window_t
            tok_s = window_steps * tokens_per_step / elapsed
            record.update(tokens_per_s=tok_s, step_time_s=elapsed / window_steps, flops_per_s=tok_s * flops_per_token)
            if peak is not None:
                record["mfu"] = tok_s * flops_per_token / (world * peak.flops)
                record["mfu_achievable"] = tok_s * flops_per_token / (world * achievable)
                record["mfu_basis"] = peak.basis
            record["storage_retries"] = storage.STATS.retries
            if reads is not None:
                # Stalls: shards the step had to wait for (the first one always; with prefetch on,
                # any later one means reading is slower than training).
                record.update(data_stalls=reads.stalls, data_wait_s=reads.wait_s - wait_seen)
                wait_seen = reads.wait_s
            if result.moe:
                record["moe"] = result.moe["layers"]
            # Mean seconds per step of each phase in the window; metrics, progress, eval and
            # checkpoint of this step land in the next window's figures.
            record["phase_s"] = {k: v / window_steps for k, v in phase_s.items()}
            phase_s.clear()
        t_phase = time.perf_counter()
        log.log(record, step)
        t_phase = spent("metrics", t_phase)
        if (t.eval_interval and step % t.eval_interval == 0) or step == t.steps:
            last_eval = run_eval()
            t_phase = spent("eval", t_phase)
        if log_now:
            if rank == 0:
                print_progress({**record, **last_eval}, stop, t.steps, time.perf_counter() - t_start, step - start_step)
            t_phase = spent("progress", t_phase)
            window_t, window_steps = time.perf_counter(), 0
        if step % t.checkpoint_interval == 0 or step == stop:
            metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            train_state = {"step": step, "samples": step * t.global_batch_size,
                           "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
            log.flush()  # metrics up to this checkpoint are stored with the run before it counts
            with tempfile.TemporaryDirectory(prefix="raymoe-ckpt-") as tmp:
                checkpoint.save(tmp, model, optimizer, train_state, job.model, rank, world)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=checkpoint.dir_name(step))
            spent("checkpoint", t_phase)
        # NOTE: metrics-only reports are skipped on purpose: each is a barrier that waits for the
        # controller to poll (~1 s); per-step metrics go to metrics.jsonl and the progress line.
    wall = time.perf_counter() - t_start
    done = step - start_step
    if done:
        log.log({"event": "launch_end", "steps_this_launch": done, "train_s": wall,
                 "tokens_per_s": done * tokens_per_step / wall, "world_size": world,
                 "data_stalls": reads.stalls if reads else None, "storage_retries": storage.STATS.retries}, step)
    log.close()
    if hasattr(batches.dataset, "close"):
        batches.dataset.close()


def _pace(path: str) -> None:
    """Test hook: while `path` exists, sleep the seconds it holds after every step, so that a
    tiny run lasts long enough for a node to die and come back."""
    try:
        time.sleep(float(Path(path).read_text() or 0))
    except (OSError, ValueError):
        pass


def _node_of_each_rank(world: int) -> list[str]:
    """Ray node id of every rank, in rank order (where this launch's workers were placed)."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    nodes = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return nodes


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report at INFO (its logger is named by file path); our progress line
    already says what matters."""
    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)


TASK_METRICS = (("val_mae", "MAE"), ("match_acc", "match@10"), ("recall_at_1", "R@1"))


def print_progress(r: dict, stop: int, total: int, elapsed: float, done: int) -> None:
    left = elapsed / max(done, 1) * (stop - r["step"])
    val = f" | val {r['val_loss']:.3f}" if "val_loss" in r else ""
    val += "".join(f" | {label} {r[key]:.3f}" for key, label in TASK_METRICS if key in r)
    if "moe" in r:
        worst = max(r["moe"], key=lambda s: s["imbalance"])
        val += (f" | aux {r['aux_loss']:.4f} | imbalance {worst['imbalance']:.2f}"
                f" | dropped {100 * sum(s['dropped_frac'] for s in r['moe']) / len(r['moe']):.1f}%")
    mfu = f" | MFU {100 * r['mfu']:.0f}%" if "mfu" in r else ""
    if r.get("mfu_basis") == "measured":
        mfu += " (of a measured matmul)"
    if r.get("storage_retries"):
        mfu += f" | storage retries {r['storage_retries']}"
    if r.get("data_wait_s", 0) > 0.1:  # the window waited for data: worth a mention
        mfu += f" | data wait {r['data_wait_s']:.1f}s ({r['data_stalls']} stalls)"
    print(f"[raymoe] step {r['step']:>5}/{total} | loss {r['loss']:.4f}{val} | lr {r['lr']:.2e} | "
          f"{r['tokens_per_s'] / 1e3:6.1f}k tok/s{mfu} | left {_fmt_s(left)}", flush=True)


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"
