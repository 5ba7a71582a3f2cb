"""Driver side of a run: data and config checks, the Ray Train `TorchTrainer`, the summary.

Everything that can be rejected is rejected here, before a worker starts: config, data, and a
resume onto a checkpoint written by a different model.

Data and runs may live on a local/shared disk or under a URI (`s3://bucket/runs`): every read and
write of the run goes through `cluster.data.storage`. Credentials are never part of the job's
config; processes Ray starts for this run get the standard AWS variables of this environment.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster import checkpoint
from cluster.config.job import JobConfig, dump_config
from cluster.data import storage
from cluster.data.storage import Location
from cluster.tasks.registry import build_task
from cluster.train.capacity import check_cluster, check_reachable
from cluster.train.loop import train_loop_per_worker
from cluster.train.malloc import CACHING_MALLOC_ENV


def prepare_data(job: JobConfig) -> None:
    """Create the built-in corpus if `data.path` does not exist and `data.builtin` names one."""
    d, m = job.data, job.model
    if d.builtin is not None and not storage.locate(d.path).exists():
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
    data = dataclasses.replace(job.data, path=storage.locate(job.data.path).uri)
    task = build_task(job.train.task, data, job.train)  # reads and checks the dataset's metadata
    model = task.configure_model(job.model)
    return dataclasses.replace(job, data=data, model=model)


def new_run_name(job: JobConfig) -> str:
    return f"{job.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_resume(run_dir: Path | Location, job: JobConfig) -> Path | Location | None:
    """The checkpoint a rerun would resume from, after checking it fits this model."""
    # Sizes only: the workers verify the checksums between them when they resume (the driver
    # alone would read the whole checkpoint).
    latest = checkpoint.latest_complete(run_dir, contents=False)
    if latest is not None:
        checkpoint.check_model(checkpoint.read_meta(latest), job.model, latest)
    return latest


def under_ray_job() -> bool:
    """True in the entrypoint of `ray job submit` (the job supervisor sets its job config)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def storage_root(storage_path: str) -> Location:
    """Where runs go. Under `ray job submit` the working directory is Ray's temporary copy of
    the job's files, deleted when Ray cleans up: a relative `cluster.storage_path` is then taken
    relative to RAYMOE_STORAGE_PATH (a cluster file's setup can export it; a URI works) or else
    Ray Train's own default storage, ~/ray_results."""
    if storage.is_uri(storage_path) or Path(storage_path).is_absolute() or not under_ray_job():
        return storage.locate(storage_path)
    base = os.environ.get("RAYMOE_STORAGE_PATH") or "~/ray_results"
    loc = storage.locate(base).join(storage_path)
    print(f"[raymoe] under a Ray job: cluster.storage_path={storage_path!r} would be inside Ray's temporary "
          f"working directory; storing runs under {loc.uri} instead (set cluster.storage_path to an absolute "
          "path or a URI, or RAYMOE_STORAGE_PATH, to choose)", flush=True)
    return loc


def connect(address: str | None) -> None:
    if ray.is_initialized():
        return
    # address=None: RAY_ADDRESS (set under `ray job submit`) or a running local cluster, else a
    # new embedded one. Its dashboard stays on: Ray Train's state API needs it. Outside a Ray job,
    # Ray's processes (Train's controller, the workers) get this shell's AWS variables, so a run in
    # a bucket needs nothing more; under a job they come from the job's or the cluster's setup.
    env = {} if under_ray_job() else storage.credential_env()
    ray.init(address=address, log_to_driver=True, configure_logging=False,
             **({"runtime_env": {"env_vars": env}} if env else {}))


def fit(job: JobConfig) -> dict:
    """Train `job` on Ray Train and return the run summary (also written to RUN_DIR/summary.json)."""
    t0 = time.perf_counter()
    prepare_data(job)
    job = resolve(job)
    root = storage_root(job.cluster.storage_path)
    name = job.cluster.run_name or new_run_name(job)
    job = dataclasses.replace(job, cluster=dataclasses.replace(job.cluster, run_name=name,
                                                               storage_path=root.uri))
    run = root.join(name)
    latest = check_resume(run, job)
    check_reachable(job.cluster.address)  # a job that cannot run fails here, before it writes anything
    connect(job.cluster.address)
    check_cluster(job.cluster)
    run.join("config.yaml").write_text(dump_config(job))
    _copy_tokenizer(job.data.path, run)
    print(f"[raymoe] run {name} -> {run.uri}" + (f" (resuming {latest.name})" if latest else ""), flush=True)
    storage_path, storage_fs = storage.ray_storage(root)

    c = job.cluster
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "run_dir": run.uri, "storage": root.uri,
                           # Tests stretch a tiny run so that a node can die and return mid-run.
                           "pace_file": os.environ.get("RAYMOE_TEST_PACE_FILE")},
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=(c.min_workers, c.num_workers) if c.min_workers else c.num_workers,
                                     elastic_resize_monitor_interval_s=c.resize_interval_s,
                                     use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=c.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             # Train's print patch would send each progress line twice through its logger;
                             # CPU workers keep freed activations for reuse (cluster/train/malloc.py).
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                                              **({} if c.use_gpu else CACHING_MALLOC_ENV)}}),
    )
    result = trainer.fit()
    summary = summarize(run, time.perf_counter() - t0)
    summary["checkpoint"] = run.join(Path(result.checkpoint.path).name).uri if result.checkpoint else None
    run.join("summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[raymoe] run stored at {run.uri}", flush=True)
    return summary


def _copy_tokenizer(data_path: str, run_dir: Path | Location) -> None:
    """Generation needs the tokenizer even if the dataset moves: keep its files with the run."""
    src, dst = storage.locate(data_path), storage.locate(run_dir).join("tokenizer")
    present = {c.name for c in src.children()}
    for f in ("meta.json", "tokenizer.json", "tokenizer_config.json", "special_tokens.json"):
        if f in present:
            dst.join(f).write_bytes(src.join(f).read_bytes())


def read_metrics(run_dir: str | Path | Location) -> list[dict]:
    loc = storage.locate(run_dir).join("metrics.jsonl")
    try:
        text = loc.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def step_losses(records: list[dict]) -> dict[int, float]:
    """Training loss per step; a step logged twice (re-run after a restart) keeps its last value."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def summarize(run_dir: Path | Location, wall_s: float) -> dict:
    records = read_metrics(run_dir)
    losses = step_losses(records)
    evals = [r for r in records if "val_loss" in r]
    launch = [r for r in records if r.get("event") == "launch_end"]
    last_step = max(losses) if losses else 0
    aux = {r["step"]: r["aux_loss"] for r in records if "aux_loss" in r}
    return {
        "run_dir": str(run_dir),  # a path or a URI
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
