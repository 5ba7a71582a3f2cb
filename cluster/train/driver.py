"""Driver side of a run: data and config checks, the Ray Train `TorchTrainer`, the summary.

Everything that can be rejected is rejected here, before a worker starts: config, data, and a
resume onto a checkpoint written by a different model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster import checkpoint
from cluster.config.job import JobConfig, dump_config
from cluster.tasks.registry import build_task
from cluster.train.capacity import check_cluster, check_reachable
from cluster.train.loop import train_loop_per_worker
from cluster.train.malloc import CACHING_MALLOC_ENV


def prepare_data(job: JobConfig) -> None:
    """Create the built-in corpus if `data.path` does not exist and `data.builtin` names one."""
    d, m = job.data, job.model
    if d.builtin is not None and not Path(d.path).exists():
        from cluster.data.prepare import ensure_default_dataset, ensure_task_dataset

        print(f"[raymoe] preparing the built-in '{d.builtin}' data at {d.path} ...", flush=True)
        if d.builtin == "pydoc":
            ensure_default_dataset(d.path, d.seq_len, tokenizer=d.tokenizer)
        elif d.builtin == "digits":
            ensure_task_dataset("image_text", "digits", d.path, text_len=40, image_size=getattr(m, "image_size", 8))
        else:
            ensure_task_dataset("forecast", d.builtin, d.path, context_len=m.context_len, horizon=m.horizon)


def resolve(job: JobConfig) -> JobConfig:
    """Absolute paths (workers may run elsewhere) and data-dependent model fields."""
    data = dataclasses.replace(job.data, path=str(Path(job.data.path).resolve()))
    task = build_task(job.train.task, data, job.train)  # reads and checks the dataset's metadata
    model = task.configure_model(job.model)
    return dataclasses.replace(job, data=data, model=model)


def new_run_name(job: JobConfig) -> str:
    return f"{job.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_resume(run_dir: Path, job: JobConfig) -> Path | None:
    """The checkpoint a rerun would resume from, after checking it fits this model."""
    latest = checkpoint.latest_complete(run_dir)
    if latest is not None:
        checkpoint.check_model(checkpoint.read_meta(latest), job.model, latest)
    return latest


def connect(address: str | None) -> None:
    if ray.is_initialized():
        return
    # address=None: RAY_ADDRESS (set under `ray job submit`) or a running local cluster, else a
    # new embedded one. Its dashboard stays on: Ray Train's state API needs it.
    ray.init(address=address, log_to_driver=True, configure_logging=False)


def fit(job: JobConfig) -> dict:
    """Train `job` on Ray Train and return the run summary (also written to RUN_DIR/summary.json)."""
    t0 = time.perf_counter()
    prepare_data(job)
    job = resolve(job)
    storage = Path(job.cluster.storage_path).resolve()
    name = job.cluster.run_name or new_run_name(job)
    job = dataclasses.replace(job, cluster=dataclasses.replace(job.cluster, run_name=name))
    run_dir = storage / name
    latest = check_resume(run_dir, job)
    check_reachable(job.cluster.address)  # a job that cannot run fails here, before it writes anything
    connect(job.cluster.address)
    check_cluster(job.cluster)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(job))
    _copy_tokenizer(job.data.path, run_dir)
    print(f"[raymoe] run {name} -> {run_dir}" + (f" (resuming {latest.name})" if latest else ""), flush=True)

    c = job.cluster
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "run_dir": str(run_dir), "storage": str(storage),
                           # Tests stretch a tiny run so that a node can die and return mid-run.
                           "pace_file": os.environ.get("RAYMOE_TEST_PACE_FILE")},
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=(c.min_workers, c.num_workers) if c.min_workers else c.num_workers,
                                     elastic_resize_monitor_interval_s=c.resize_interval_s,
                                     use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=c.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             # Train's print patch would send each progress line twice through its logger;
                             # CPU workers keep freed activations for reuse (cluster/train/malloc.py).
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                                              **({} if c.use_gpu else CACHING_MALLOC_ENV)}}),
    )
    result = trainer.fit()
    summary = summarize(run_dir, time.perf_counter() - t0)
    summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _copy_tokenizer(data_path: str, run_dir: Path) -> None:
    """Generation needs the tokenizer even if the dataset moves: keep its files with the run."""
    dst = run_dir / "tokenizer"
    dst.mkdir(exist_ok=True)
    for f in ("meta.json", "tokenizer.json", "tokenizer_config.json", "special_tokens.json"):
        if (Path(data_path) / f).is_file():
            shutil.copy2(Path(data_path) / f, dst / f)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def step_losses(records: list[dict]) -> dict[int, float]:
    """Training loss per step; a step logged twice (re-run after a restart) keeps its last value."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def summarize(run_dir: Path, wall_s: float) -> dict:
    records = read_metrics(run_dir)
    losses = step_losses(records)
    evals = [r for r in records if "val_loss" in r]
    launch = [r for r in records if r.get("event") == "launch_end"]
    last_step = max(losses) if losses else 0
    aux = {r["step"]: r["aux_loss"] for r in records if "aux_loss" in r}
    return {
        "run_dir": str(run_dir),
        "steps": last_step,
        "final_train_loss": losses.get(last_step),
        "final_aux_loss": aux.get(last_step),
        "first_val_loss": evals[0]["val_loss"] if evals else None,
        "last_val_loss": evals[-1]["val_loss"] if evals else None,
        "last_val_ppl": evals[-1].get("val_ppl") if evals else None,
        "last_eval": {k: v for k, v in evals[-1].items() if k not in ("time", "step")} if evals else {},
        "tokens_per_s": launch[-1]["tokens_per_s"] if launch else None,
        "world_size": launch[-1]["world_size"] if launch else None,
        "wall_s": wall_s,
    }
