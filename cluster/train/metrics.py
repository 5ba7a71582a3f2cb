"""Training metrics: one interface (`log(metrics, step)`, `close()`), a JSON-lines file and Prometheus.

Rank 0 of a run owns the metrics. Its Prometheus exporter is raymoe's own HTTP server
(prometheus-client, series prefixed `raymoe_`, labelled `run` and, for MoE, `layer` and
`expert`), independent of Ray's metrics agent and its `ray_` series. It binds to 127.0.0.1
unless `metrics.host` says otherwise and writes a Prometheus `file_sd` target file so a server
started with `cluster/train/monitoring/prometheus.yml` finds it. An exporter that cannot start (port
taken, unwritable directory) prints a warning; training never dies for it.

Cardinality: per-layer MoE summaries are always exported; per-expert token counts (the heatmap)
only while layers x experts <= `metrics.expert_series_limit` (256 by default), since real models
(48 layers x 128 experts) would otherwise create thousands of series per run.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.registry import Collector

from cluster.data import storage
from cluster.data.storage import Location

TRAIN_SERIES = {  # record key -> (series, help)
    "loss": ("raymoe_loss", "training loss (task loss, mean over the global batch)"),
    "val_loss": ("raymoe_val_loss", "validation loss"),
    "lr": ("raymoe_learning_rate", "learning rate"),
    "grad_norm": ("raymoe_grad_norm", "global gradient norm before clipping"),
    "loss_scale": ("raymoe_loss_scale", "fp16 dynamic loss scale"),
    "tokens_per_s": ("raymoe_tokens_per_s", "training throughput over the last logging window"),
    "step_time_s": ("raymoe_step_time_seconds", "mean optimizer-step time over the last logging window"),
    "mfu": ("raymoe_mfu", "model FLOPs utilisation: model FLOPs/s over (workers x peak FLOPs/s): the datasheet "
            "bf16 dense peak, metrics.peak_flops, or (CPU, unknown devices) a measured matmul"),
    "mfu_achievable": ("raymoe_mfu_achievable", "model FLOPs/s over (workers x a large matmul measured at start)"),
    "aux_loss": ("raymoe_aux_loss", "MoE auxiliary losses (weighted, summed over layers)"),
    "step": ("raymoe_step", "optimizer steps done"),
    "storage_retries": ("raymoe_storage_retries", "transient storage errors retried by this process (reset, timeout, 5xx, throttling)"),
    "data_stalls": ("raymoe_data_stalls", "training shards the loop had to wait for (the first one always)"),
    "data_wait_s": ("raymoe_data_wait_seconds", "seconds the loop waited for data over the last logging window"),
}
LAYER_SERIES = {  # per-layer MoE summary key -> (series, help)
    "aux_loss": ("raymoe_moe_aux_loss", "weighted auxiliary loss of the layer"),
    "lb_loss": ("raymoe_moe_load_balancing_loss", "Switch load-balancing loss (unweighted; 1 = uniform)"),
    "z_loss": ("raymoe_moe_z_loss", "router z-loss (unweighted)"),
    "imbalance": ("raymoe_moe_imbalance", "max / mean tokens per expert"),
    "cv": ("raymoe_moe_load_cv", "coefficient of variation of tokens per expert"),
    "dead_experts": ("raymoe_moe_dead_experts", "experts that received no token in the step"),
    "router_entropy": ("raymoe_moe_router_entropy", "mean entropy of the router distribution (nats)"),
    "dropped_frac": ("raymoe_moe_dropped_fraction", "share of token copies dropped by capacity"),
    "a2a_s": ("raymoe_moe_all_to_all_seconds", "time in the expert-parallel exchange per step (rank 0)"),
}
EXPERT_SERIES = ("raymoe_moe_expert_tokens", "tokens routed to the expert in the step (before dropping)")


class JsonlBackend:
    """Appends one JSON line per call to RUN_DIR/metrics.jsonl (what summaries and plots read).

    A run in an object store (no appends there): the lines go to a local file that is uploaded
    whole at every `flush` (before each checkpoint), every `sync_s` seconds and at `close`; a
    relaunch starts from the stored copy. Lines after the last checkpoint can be lost with the
    worker, and those steps are trained (and logged) again after the restart anyway.
    """

    def __init__(self, path: Path | Location, sync_s: float = 30.0):
        loc = storage.locate(path)
        self.remote = None if loc.is_local else loc
        if self.remote is None:
            self.path = Path(loc.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.path = Path(tempfile.mkdtemp(prefix="raymoe-metrics-")) / "metrics.jsonl"
            try:
                self.path.write_bytes(self.remote.read_bytes())
            except FileNotFoundError:
                pass
        with open(self.path, "a"):
            pass  # fail now, with the path in the message, if the directory is not writable
        self.sync_s, self._synced = sync_s, time.monotonic()

    def log(self, metrics: dict, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), **metrics, "step": step}) + "\n")
        if self.remote is not None and time.monotonic() - self._synced > self.sync_s:
            self.flush()

    def flush(self) -> None:
        if self.remote is not None:
            self.remote.write_bytes(self.path.read_bytes())
            self._synced = time.monotonic()

    def close(self) -> None:
        self.flush()


class _ScrapeCounter(Collector):
    """Counts scrapes, so `close` can wait until the final values have been read."""

    def __init__(self):
        self.count = 0

    def collect(self):
        self.count += 1
        return []


class PrometheusBackend:
    """Gauges on raymoe's own registry, served over HTTP; see the module docstring."""

    def __init__(self, run: str, host: str, port: int, file_sd_dir: Path | None, expert_series_limit: int,
                 linger_s: float = 0.0):
        self.run, self.linger_s, self.expert_limit = run, linger_s, expert_series_limit
        self.registry = CollectorRegistry()
        self.scrapes = _ScrapeCounter()
        self.registry.register(self.scrapes)
        self.train = {k: Gauge(name, doc, ["run"], registry=self.registry) for k, (name, doc) in TRAIN_SERIES.items()}
        self.layer = {k: Gauge(name, doc, ["run", "layer"], registry=self.registry)
                      for k, (name, doc) in LAYER_SERIES.items()}
        self.expert = Gauge(*EXPERT_SERIES, ["run", "layer", "expert"], registry=self.registry)
        self.expert_series_on: bool | None = None
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self.server.server_port
        self.address = f"{host}:{self.port}"
        self.target_file = None
        if file_sd_dir is not None:
            file_sd_dir.mkdir(parents=True, exist_ok=True)
            self.target_file = file_sd_dir / f"raymoe-{run}.json"
            tmp = self.target_file.with_suffix(".tmp")
            tmp.write_text(json.dumps([{"targets": [self.address], "labels": {"run": run}}]))
            tmp.replace(self.target_file)  # Prometheus never reads a half-written file
        self._last_update = 0

    def log(self, metrics: dict, step: int) -> None:
        for key, gauge in self.train.items():
            value = step if key == "step" else metrics.get(key)
            if isinstance(value, (int, float)):
                gauge.labels(self.run).set(value)
        layers = metrics.get("moe") or []
        if layers and self.expert_series_on is None:
            self.expert_series_on = len(layers) * len(layers[0]["tokens_per_expert"]) <= self.expert_limit
            if not self.expert_series_on:
                print(f"[raymoe] metrics: {len(layers)} layers x {len(layers[0]['tokens_per_expert'])} experts "
                      f"exceeds metrics.expert_series_limit={self.expert_limit}; per-expert series are off, "
                      "per-layer summaries stay on", flush=True)
        for stats in layers:
            layer = str(stats["layer"])
            for key, gauge in self.layer.items():
                if key in stats:
                    gauge.labels(self.run, layer).set(stats[key])
            if self.expert_series_on:
                for e, tokens in enumerate(stats["tokens_per_expert"]):
                    self.expert.labels(self.run, layer, str(e)).set(tokens)
        self._last_update = self.scrapes.count

    def close(self) -> None:
        """Wait (up to linger_s) for one scrape after the last update, then stop serving."""
        deadline = time.monotonic() + self.linger_s
        while self.scrapes.count <= self._last_update and time.monotonic() < deadline:
            time.sleep(0.1)
        self.server.shutdown()
        self.server.server_close()
        if self.target_file is not None:
            self.target_file.unlink(missing_ok=True)


class MetricsLogger:
    """The training loop's one metrics interface; a no-op on ranks other than 0."""

    def __init__(self, backends: list):
        self.backends = backends

    def log(self, metrics: dict, step: int) -> None:
        for backend in self.backends:
            backend.log(metrics, step)

    def flush(self) -> None:
        """Store what has been logged so far with the run (matters for a run in a bucket)."""
        for backend in self.backends:
            if hasattr(backend, "flush"):
                backend.flush()

    def close(self) -> None:
        for backend in self.backends:
            backend.close()

    @property
    def prometheus(self) -> PrometheusBackend | None:
        return next((b for b in self.backends if isinstance(b, PrometheusBackend)), None)


def build_metrics(cfg, run: str, run_dir: Path | Location, storage_root: Path | Location,
                  rank: int) -> MetricsLogger:
    """Rank 0: the JSON-lines file (unless metrics.jsonl is off) and, if enabled, the exporter."""
    if rank != 0:
        return MetricsLogger([])
    backends: list = []
    metrics_file = storage.locate(run_dir).join("metrics.jsonl")
    if cfg.jsonl:
        try:
            backends.append(JsonlBackend(metrics_file))
        except OSError as e:
            _warn(f"cannot write metrics to {metrics_file.uri} ({e}); training goes on without them")
    if cfg.prometheus:
        root = storage.locate(storage_root)
        # Prometheus reads its targets from a local file: runs in a bucket put it in the temp dir.
        default_sd = Path(root.path) if root.is_local else Path(tempfile.gettempdir()) / "raymoe"
        sd_dir = Path(cfg.file_sd_dir) if cfg.file_sd_dir else default_sd / "prometheus_targets"
        try:
            exporter = PrometheusBackend(run, cfg.host, cfg.port, sd_dir, cfg.expert_series_limit, cfg.linger_s)
            backends.append(exporter)
            print(f"[raymoe] metrics exporter at http://{exporter.address}/metrics (file_sd {exporter.target_file})",
                  flush=True)
        except OSError as e:
            _warn(f"metrics exporter could not start on {cfg.host}:{cfg.port} ({e}); set metrics.port to a free "
                  "port (0 picks one) or metrics.prometheus: false. Training goes on without it")
    return MetricsLogger(backends)


@dataclass(frozen=True)
class Accelerator:
    """One known accelerator: its dense bf16 tensor-core peak (no 2:4 sparsity) per GPU."""

    name: str
    match: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that pick this entry (all must occur)
    bf16_dense_flops: float
    source: str


# Dense bf16 peaks per GPU from the vendor's datasheets (the datasheets print the 2:4-sparse figure
# first; dense is half of it). More specific entries first: "GB200" before "B200", the H100 PCIe
# and NVL cards before the SXM part (whose device name is "NVIDIA H100 80GB HBM3").
ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("A100", ("A100",), 312e12, "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS (624 sparse)"),
    Accelerator("A800", ("A800",), 312e12, "NVIDIA A800 datasheet: BF16 312 TFLOPS (624 sparse), as the A100"),
    Accelerator("L40S", ("L40S",), 362e12, "NVIDIA L40S datasheet: BF16 733 TFLOPS sparse"),
    Accelerator("L4", ("L4",), 121e12, "NVIDIA L4 datasheet: BF16 242 TFLOPS sparse"),
    Accelerator("H100 PCIe", ("H100", "PCIE"), 756e12, "NVIDIA H100 datasheet: H100 PCIe BF16 1,513 TFLOPS sparse"),
    Accelerator("H100 NVL", ("H100", "NVL"), 835e12, "NVIDIA H100 datasheet: H100 NVL BF16 1,671 TFLOPS sparse"),
    Accelerator("H100 SXM", ("H100",), 989e12, "NVIDIA H100 datasheet: H100 SXM BF16 1,979 TFLOPS sparse"),
    Accelerator("H800 PCIe", ("H800", "PCIE"), 756e12, "NVIDIA H800 datasheet: H800 PCIe BF16 1,513 TFLOPS sparse"),
    Accelerator("H800", ("H800",), 989e12, "NVIDIA H800 datasheet: H800 SXM BF16 1,979 TFLOPS sparse"),
    Accelerator("H200 NVL", ("H200", "NVL"), 835e12, "NVIDIA H200 datasheet: H200 NVL BF16 1,671 TFLOPS sparse"),
    Accelerator("H200", ("H200",), 989e12, "NVIDIA H200 datasheet: H200 SXM BF16 1,979 TFLOPS sparse"),
    Accelerator("GB200", ("GB200",), 2.5e15, "NVIDIA GB200 NVL72 datasheet: FP16/BF16 360 PFLOPS sparse per 72 GPUs"),
    Accelerator("B200", ("B200",), 2.25e15, "NVIDIA DGX/HGX B200 datasheet: FP16/BF16 36 PFLOPS sparse per 8 GPUs"),
)


def known_accelerator(device_name: str) -> Accelerator | None:
    """The table entry whose match strings all occur in `device_name` (case-insensitive), first wins."""
    upper = device_name.upper()
    return next((a for a in ACCELERATORS if all(m in upper for m in a.match)), None)


@dataclass(frozen=True)
class Peak:
    """The MFU denominator of one worker and where it came from."""

    flops: float
    basis: str  # "configured" | "datasheet" | "measured"
    what: str  # a human line: which entry or measurement


def peak_flops(device, configured: float | None = None, device_name: str | None = None) -> Peak:
    """The peak FLOP/s MFU divides by, as the field defines MFU (PaLM): `metrics.peak_flops` if set,
    else the datasheet bf16 dense peak of a known accelerator (picked from the device name), else a
    matmul measured here, labelled `measured` (on CPU there is no table entry: MFU there is
    utilisation of an achievable figure, and reads higher than MFU against a peak would)."""
    import torch

    device = torch.device(device)
    if configured is not None:
        return Peak(float(configured), "configured", f"metrics.peak_flops = {configured:.3g} FLOP/s")
    if device.type == "cuda" and device_name is None:
        device_name = torch.cuda.get_device_name(device)
    entry = known_accelerator(device_name) if device_name else None
    if entry is not None:
        return Peak(entry.bf16_dense_flops, "datasheet", f"{entry.name} bf16 dense peak ({entry.source})")
    measured = measure_peak_flops(device)
    what = "no datasheet entry for " + (device_name or device.type) + "; a matmul measured at start"
    return Peak(measured, "measured", what)


def measure_peak_flops(device, dtype=None) -> float:
    """FLOP/s of a large matmul on this worker: the "achievable" figure (MFU_achievable's
    denominator), and the MFU denominator only where no datasheet peak is known (CPU)."""
    import torch

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _warn(msg: str) -> None:
    print(f"[raymoe] WARNING: {msg}", file=sys.stderr, flush=True)
