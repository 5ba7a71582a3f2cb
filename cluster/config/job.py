"""The job configuration: one `JobConfig` of nested sections, loaded from YAML plus `--set` overrides.

Every check that can fail runs here, on the driver, before any Ray worker starts: unknown keys,
wrong types, and values that are inconsistent with each other or with the number of workers.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml

import archs
import kernels
from cluster.config.typed import (
    ConfigError,
    apply_overrides,
    check_keys,
    from_dict,
    to_dict,
)
from parallel.mesh import ParallelDims

CONFIG_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@dataclass
class TrainConfig:
    task: Annotated[Literal["lm", "distill", "forecast", "image_text"], "training task (cluster/tasks/): lm; distill (soft targets of train.teacher, cluster/tasks/distill.py); "
        "forecast (windows over a series, cluster/tasks/forecast.py); image_text (cluster/tasks/image_text.py)"] = "lm"
    teacher: Annotated[str | None, "distill: the teacher's run directory (its latest complete checkpoint is used)"] = None
    distill_alpha: Annotated[float, "distill: weight of the KL to the teacher; 1 - alpha weights the data loss"] = 0.5
    distill_temperature: Annotated[float, "distill: softmax temperature of teacher and student (KL scaled by its square)"] = 1.0
    steps: Annotated[int, "optimizer steps in the whole run (the LR schedule spans them)"] = 200
    stop_at_step: Annotated[int | None, "end this launch after this step (a later launch of the same run resumes)"] = None
    global_batch_size: Annotated[int, "sequences per optimizer step over all workers"] = 16
    micro_batch_size: Annotated[int, "sequences per forward/backward on one worker; the rest is gradient accumulation"] = 8
    lr: Annotated[float, "peak learning rate"] = 1e-3
    min_lr_ratio: Annotated[float, "final learning rate as a fraction of lr (cosine decay)"] = 0.1
    warmup_steps: Annotated[int, "linear warmup steps"] = 20
    weight_decay: Annotated[float, "AdamW weight decay (not applied to norms and embeddings)"] = 0.1
    betas: Annotated[tuple[float, float], "AdamW betas"] = (0.9, 0.95)
    grad_clip: Annotated[float | None, "clip the global gradient norm to this; null = off"] = 1.0
    precision: Annotated[Literal["fp32", "bf16", "fp16"], "autocast dtype; fp16 uses dynamic loss scaling and needs GPUs"] = "fp32"
    activation_checkpointing: Annotated[bool, "recompute each block's activations in backward"] = False
    compile: Annotated[bool, "torch.compile each block (regional; MoE layers stay eager but for their experts' "
                             "SwiGLU); the first steps pay the compile time"] = False
    eval_interval: Annotated[int, "validate every this many steps (and at the start and end); 0 = only at the end"] = 50
    eval_sequences: Annotated[int, "validation sequences per evaluation"] = 64
    log_interval: Annotated[int, "progress line and metrics every this many steps"] = 10
    checkpoint_interval: Annotated[int, "checkpoint every this many steps (and at the end)"] = 100
    seed: Annotated[int, "seed of the model init and the data order"] = 0

    def __post_init__(self):
        for name in ("steps", "global_batch_size", "micro_batch_size", "eval_sequences", "log_interval", "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} exceeds steps={self.steps}")
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.steps:
            raise ValueError(f"stop_at_step: must be in [1, steps={self.steps}], got {self.stop_at_step}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size: {self.global_batch_size} is not a multiple of "
                             f"micro_batch_size={self.micro_batch_size}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip: must be > 0 or null, got {self.grad_clip}")
        if (self.task == "distill") != (self.teacher is not None):
            raise ValueError("teacher: set it (a run directory) exactly when task: distill; "
                             f"got task={self.task!r}, teacher={self.teacher!r}")
        if not 0 <= self.distill_alpha <= 1 or self.distill_temperature <= 0:
            raise ValueError(f"distill_alpha/distill_temperature: need alpha in [0, 1] and temperature > 0, got "
                             f"{self.distill_alpha}/{self.distill_temperature}")


@dataclass
class DataConfig:
    path: Annotated[str, "dataset written by `python -m jobs.prepare_data`: a directory or a pyarrow.fs URI (s3://bucket/prefix)"] = "data/pydoc-byte"
    builtin: Annotated[Literal["pydoc", "co2", "sunspots", "digits"] | None, "if path does not exist, prepare this bundled dataset there first (pydoc text for lm; co2 or sunspots "
        "for forecast; digits for image_text); null = path must exist"] = "pydoc"
    tokenizer: Annotated[Literal["byte", "bpe"], "tokenizer used when the built-in corpus is prepared"] = "byte"
    seq_len: Annotated[int, "sequence length used when the built-in corpus is prepared"] = 256
    prefetch: Annotated[bool, "read the next training shard in a background thread while the current one trains"] = True
    read_timeout_s: Annotated[float, "object-store connect/read timeout; a stalled read fails after it and is retried"] = 30.0
    read_attempts: Annotated[int, "tries per shard read on transient errors (reset, timeout, 5xx, throttling), with exponential backoff"] = 6

    def __post_init__(self):
        if not self.path:
            raise ValueError("path: is empty; point it at a dataset directory from `python -m jobs.prepare_data`")
        if self.seq_len < 2:
            raise ValueError(f"seq_len: must be >= 2, got {self.seq_len}")
        if self.read_timeout_s <= 0:
            raise ValueError(f"read_timeout_s: must be > 0, got {self.read_timeout_s}")
        if self.read_attempts < 1:
            raise ValueError(f"read_attempts: must be >= 1, got {self.read_attempts}")


@dataclass
class ParallelConfig:
    tp: Annotated[int, "tensor-parallel degree: attention heads and MLP hidden units split over this many workers"] = 1
    pp: Annotated[int, "pipeline-parallel degree: the layers cut into this many stages, one per worker"] = 1
    dp: Annotated[int | None, "data-parallel degree; null = what tp and pp leave (workers / (tp x pp))"] = None
    ep: Annotated[int | Literal["auto"], "expert-parallel degree, inside dp (divides dp and the number of experts); auto = the largest that does"] = 1
    schedule: Annotated[Literal["gpipe", "1f1b", "interleaved_1f1b"], "pipeline schedule (pp > 1); interleaved_1f1b puts 2 stages on each worker"] = "1f1b"
    microbatches: Annotated[int | None, "pipeline micro-batches per step and worker (pp > 1); null = the step's "
                                   "train.micro_batch_size micro-batches"] = None
    pp_split: Annotated[list[int] | None, "first layer of every pipeline stage after the first, e.g. [3]; "
                                     "null = an even cut by layer count"] = None
    fsdp: Annotated[bool | int, "shard weights, gradients and AdamW state (FSDP2): true = dense weights over all "
                                "data-parallel ranks, experts over their expert group; a degree d = shard over d "
                                "ranks, replicate over dp / d (HSDP); false = replicate (DDP)"] = False
    fsdp_meta_init: Annotated[bool, "FSDP without tp/pp: build the model on the meta device, each worker "
                                    "materialising only its shards (same values as the ordinary build)"] = True
    fsdp_reshard_after_forward: Annotated[bool, "FSDP: free each block's gathered weights after its forward and "
                                                "gather again in backward (less memory, one more all-gather)"] = True
    ep_overlap_chunks: Annotated[int, "expert parallelism: split each token exchange into this many chunks, pipelined "
                                      "with the experts (1 = one exchange, no overlap)"] = 1

    def __post_init__(self):
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.dp is not None and self.dp < 1:
            raise ValueError(f"dp: must be >= 1 or null, got {self.dp}")
        if self.ep != "auto" and self.ep < 1:
            raise ValueError(f"ep: must be >= 1 or 'auto', got {self.ep}")
        if self.ep_overlap_chunks < 1:
            raise ValueError(f"ep_overlap_chunks: must be >= 1, got {self.ep_overlap_chunks}")
        if self.microbatches is not None and self.microbatches < 1:
            raise ValueError(f"microbatches: must be >= 1 or null, got {self.microbatches}")
        if not isinstance(self.fsdp, bool) and self.fsdp < 0:
            raise ValueError(f"fsdp: must be true, false or a degree >= 1, got {self.fsdp}")
        if self.pp == 1 and (self.microbatches is not None or self.pp_split is not None):
            raise ValueError("microbatches/pp_split: only used with pipeline parallelism (pp > 1); "
                             "without it, train.micro_batch_size sets the micro-batches")

    @property
    def stages_per_worker(self) -> int:
        return 2 if self.schedule == "interleaved_1f1b" else 1


@dataclass
class ClusterConfig:
    address: Annotated[str | None, "Ray address; null = RAY_ADDRESS / the job's cluster, else an embedded local Ray"] = None
    num_workers: Annotated[int, "Ray Train workers (one per GPU, or per CPU slot); the maximum of an elastic range"] = 2
    min_workers: Annotated[int | None, "elastic training: run on any worker count in [min_workers, num_workers]; null = fixed"] = None
    use_gpu: Annotated[bool, "one GPU per worker, NCCL; false = CPU workers, gloo"] = False
    cpus_per_worker: Annotated[float, "CPUs reserved per worker"] = 1.0
    storage_path: Annotated[str, "where runs live: a path (shared storage on a multi-node cluster) or a pyarrow.fs URI (s3://bucket/runs); relative under `ray job submit` = below RAYMOE_STORAGE_PATH or ~/ray_results"] = "runs"
    run_name: Annotated[str | None, "run name; an existing run of this name resumes; null = a new timestamped name"] = None
    keep_checkpoints: Annotated[int, "checkpoints kept per run (older ones are deleted after a newer one is complete)"] = 2
    max_failures: Annotated[int, "worker-group restarts from the last checkpoint before the run fails"] = 0
    autoscaling_config: Annotated[str | None, "the autoscaler config the cluster runs (the cluster launcher leaves it at ~/ray_bootstrap_config.yaml on the "
        "head, where `ray job submit` drivers run); its node types let a job no node can hold fail at once instead of "
        "waiting for nodes that never come; null or a missing file = check against the nodes alive now, and only "
        "if the cluster has no autoscaler"] = "~/ray_bootstrap_config.yaml"
    resize_interval_s: Annotated[float, "elastic training: how often Ray Train checks whether more workers now fit "
                                   "(a grow restarts the group from the last checkpoint)"] = 60.0
    num_threads: Annotated[int | None, "torch intra-op threads per worker; null = cpus_per_worker"] = None

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"num_workers: must be >= 1, got {self.num_workers}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(f"min_workers: must be in [1, num_workers={self.num_workers}], got {self.min_workers}")
        if self.resize_interval_s < 0:
            raise ValueError(f"resize_interval_s: must be >= 0, got {self.resize_interval_s}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name.startswith(".")):
            raise ValueError(f"run_name: {self.run_name!r} must be a plain directory name")


@dataclass
class MetricsConfig:
    jsonl: Annotated[bool, "append per-step metrics to RUN_DIR/metrics.jsonl (rank 0)"] = True
    prometheus: Annotated[bool, "serve raymoe_* series on /metrics from rank 0 (prometheus-client)"] = True
    host: Annotated[str, "exporter bind address; keep 127.0.0.1 unless a remote Prometheus must scrape it"] = "127.0.0.1"
    port: Annotated[int, "exporter port; 0 = a free one (printed, and written to the file_sd target file)"] = 0
    file_sd_dir: Annotated[str | None, "where the Prometheus file_sd target file goes; null = STORAGE/prometheus_targets"] = None
    expert_series_limit: Annotated[int, "export per-expert token series while layers x experts <= this (cardinality bound)"] = 256
    linger_s: Annotated[float, "at the end, keep serving up to this long until the final values were scraped"] = 0.0
    peak_flops: Annotated[float | None, "peak FLOP/s of one worker for MFU; null = the datasheet bf16 dense peak of a known GPU (cluster.train.metrics.ACCELERATORS), else a matmul measured at start, labelled measured"] = None

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        if self.expert_series_limit < 0 or self.linger_s < 0:
            raise ValueError("expert_series_limit/linger_s: must be >= 0")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"peak_flops: must be > 0 or null, got {self.peak_flops}")


# The bundled datasets each task can prepare on first use (data.builtin).
BUILTIN_DATA = {"lm": ("pydoc",), "distill": ("pydoc",), "forecast": ("co2", "sunspots"), "image_text": ("digits",)}


@dataclass
class JobConfig:
    model: Annotated[Any, "model family config: `arch`, optional `preset`, then the family's fields"] = field(default_factory=lambda: archs.family("transformer").config_cls())
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self):
        t, c, par = self.train, self.cluster, self.parallel
        builtins = BUILTIN_DATA[t.task]
        if self.data.builtin is not None and self.data.builtin not in builtins:
            raise ConfigError(f"data.builtin: {self.data.builtin!r} is not data for train.task={t.task}; use "
                              f"{' or '.join(builtins)}, or null with a data.path made by jobs.prepare_data")
        if par.dp is not None and c.min_workers is not None:
            raise ConfigError(f"parallel.dp: a fixed {par.dp} cannot hold at every size of the elastic range "
                              f"{c.min_workers}..{c.num_workers}; set it to null")
        for world in self.world_sizes:  # every size an elastic run may see, before any worker starts
            at = f" (at {world} workers of the elastic range {c.min_workers}..{c.num_workers})" if c.min_workers else ""
            try:
                dims = self.parallel_dims(world)
                self._check_pipeline(dims)
                self._check_fsdp(dims)
            except ValueError as e:
                raise ConfigError(f"{e}{at}") from None
            if t.global_batch_size % (t.micro_batch_size * dims.dp):
                who = "workers" if dims.dp == world else "data-parallel ranks (parallel.dp)"
                raise ConfigError(
                    f"train.global_batch_size: {t.global_batch_size} is not divisible by micro_batch_size x {who} "
                    f"= {t.micro_batch_size} x {dims.dp}{at}; use a multiple of {t.micro_batch_size * dims.dp}")
            if par.microbatches is not None and (t.global_batch_size // dims.dp) % par.microbatches:
                raise ConfigError(f"parallel.microbatches: {par.microbatches} does not divide the "
                                  f"{t.global_batch_size // dims.dp} sequences each data-parallel rank gets per step "
                                  f"(train.global_batch_size / dp){at}")
        if t.precision == "fp16" and not self.cluster.use_gpu:
            raise ConfigError("train.precision: fp16 needs GPUs (cluster.use_gpu: true); use fp32 or bf16 on CPU")
        self._check_kernel_backend()

    def _check_kernel_backend(self) -> None:
        """An explicitly requested MoE kernel backend that cannot run on the workers' device and
        dtype fails here, on the driver, with the reason and install hint."""
        moe = getattr(self.model, "moe", None)
        if moe is None or moe.backend == "auto":
            return
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.train.precision]
        d_model = getattr(self.model, "d_model", None)
        widths = (d_model, 2 * moe.expert_hidden, moe.expert_hidden) if d_model else ()
        try:
            kernels.check_requested(moe.backend, "cuda" if self.cluster.use_gpu else "cpu", dtype, widths)
        except kernels.BackendUnavailable as e:
            raise ConfigError(f"model.moe.backend: {e} (train.precision={self.train.precision}, "
                              f"cluster.use_gpu={self.cluster.use_gpu}); or use backend: auto") from None

    def _check_fsdp(self, dims: ParallelDims) -> None:
        from parallel.fsdp import check_degree, refused

        check_degree(self.parallel.fsdp, dims.dp)
        problem = refused(self.parallel.fsdp, dims, self.model, self.parallel.schedule)
        if problem:
            raise ValueError(problem)

    def _check_pipeline(self, dims: ParallelDims) -> None:
        if dims.pp == 1:
            return
        from parallel.pipeline import stage_layers

        stage_layers(self.model.n_layers, dims.pp * self.parallel.stages_per_worker, self.parallel.pp_split)
        n_micro = self.parallel.microbatches or self.train.global_batch_size // (self.train.micro_batch_size * dims.dp)
        if self.parallel.schedule != "gpipe" and n_micro < dims.pp:
            raise ValueError(f"parallel.microbatches: {self.parallel.schedule} needs at least pp={dims.pp} micro-batches "
                             f"per step, got {n_micro}; raise parallel.microbatches (or lower train.micro_batch_size)")
        if self.parallel.schedule == "interleaved_1f1b" and n_micro % max(1, n_micro // dims.pp):
            raise ValueError(f"parallel.microbatches: interleaved_1f1b needs the {n_micro} micro-batches to be a "
                             f"multiple of {max(1, n_micro // dims.pp)} (rounds of pp={dims.pp})")

    @property
    def world_sizes(self) -> list[int]:
        c = self.cluster
        return list(range(c.min_workers or c.num_workers, c.num_workers + 1))

    def parallel_dims(self, world: int | None = None) -> ParallelDims:
        """The layout at `world` workers (default: cluster.num_workers)."""
        p = self.parallel
        return ParallelDims.build(world or self.cluster.num_workers, p.ep, num_experts(self.model), tp=p.tp, pp=p.pp,
                                  dp=p.dp, model_cfg=self.model)

    @property
    def accumulation_steps(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.parallel_dims().dp)


def num_experts(model_cfg: Any) -> int | None:
    """Experts per MoE layer of a model config, or None for a model without MoE layers."""
    moe = getattr(model_cfg, "moe", None)
    return moe.num_experts if moe is not None else None


def model_from_dict(data: dict | None) -> Any:
    """`{"arch": ..., "preset": ..., **fields}` -> the family's config (preset values, then fields)."""
    data = dict(data or {})
    arch = data.pop("arch", "transformer")
    preset = data.pop("preset", None)
    try:
        fam = archs.family(arch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    base: dict = {}
    if preset is not None:
        if preset not in fam.presets:
            raise ConfigError(f"model.preset: unknown preset {preset!r} for {arch}; valid: {', '.join(fam.presets)}")
        base = dict(fam.presets[preset])
    check_keys(fam.config_cls, data, "model", extra=("preset",))
    return from_dict(fam.config_cls, deep_merge(base, {**data, "arch": arch}), "model")


def deep_merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`, merging nested mappings (a preset's `moe:` keeps its other keys)."""
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def job_from_dict(data: dict | None) -> JobConfig:
    data = dict(data or {})
    check_keys(JobConfig, data, "")
    model = model_from_dict(data.pop("model", None))
    hints = typing.get_type_hints(JobConfig)
    sections = {f.name: from_dict(hints[f.name], data.get(f.name) or {}, f.name)
                for f in dataclasses.fields(JobConfig) if f.name != "model"}
    return JobConfig(model=model, **sections)


def resolve_config_path(name: str) -> Path:
    """A path, or the name of a file in jobs/configs/ (with or without .yaml)."""
    p = Path(name)
    for cand in (p, CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"--config {name!r}: no such file (built-in configs: {known})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load YAML (`yaml.safe_load`), apply `--set` overrides, validate everything."""
    data: dict = {}
    if path is not None:
        p = resolve_config_path(str(path))
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections (model, train, data, ...)")
    apply_overrides(data, overrides or [])
    return job_from_dict(data)


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
