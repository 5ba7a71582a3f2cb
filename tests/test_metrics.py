"""Metrics: the exporter's series, its cardinality bound and failure modes, the shipped dashboard,
a real Prometheus server scraping a live MoE run, and the plots of a run."""
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from cluster.config.job import MetricsConfig, load_config
from cluster.train.metrics import PrometheusBackend, build_metrics
from tests.conftest import REPO, free_port

MONITORING = REPO / "cluster" / "train" / "monitoring"


def record(layers=2, experts=4):
    moe = [{"layer": i, "tokens_per_expert": [float(10 * e + i) for e in range(experts)], "imbalance": 1.5 + i,
            "cv": 0.3, "dead_experts": 0, "dropped_frac": 0.1 * i, "router_entropy": 1.2, "lb_loss": 1.01,
            "z_loss": 2.0, "aux_loss": 0.02, "a2a_s": 0.003} for i in range(layers)]
    return {"loss": 2.5, "val_loss": 2.6, "lr": 1e-3, "grad_norm": 0.9, "loss_scale": 1.0, "tokens_per_s": 5000.0,
            "step_time_s": 0.6, "mfu": 0.4, "aux_loss": 0.04, "moe": moe}


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return r.read().decode()


def test_exporter_serves_the_series_on_loopback_and_writes_a_target_file(tmp_path):
    exp = PrometheusBackend("r1", "127.0.0.1", 0, tmp_path / "sd", expert_series_limit=256)
    try:
        assert exp.address.startswith("127.0.0.1:") and exp.port > 0
        target = json.loads((tmp_path / "sd" / "raymoe-r1.json").read_text())
        assert target == [{"targets": [exp.address], "labels": {"run": "r1"}}]
        exp.log(record(), step=7)
        text = scrape(exp.address)
        assert 'raymoe_loss{run="r1"} 2.5' in text and 'raymoe_step{run="r1"} 7.0' in text
        assert 'raymoe_moe_imbalance{layer="1",run="r1"} 2.5' in text
        assert 'raymoe_moe_expert_tokens{expert="3",layer="1",run="r1"} 31.0' in text
        assert len(re.findall(r"^raymoe_moe_expert_tokens\{", text, re.M)) == 8  # layers x experts
    finally:
        exp.close()
    assert not (tmp_path / "sd" / "raymoe-r1.json").exists()


def test_per_expert_series_are_bounded(tmp_path, capsys):
    exp = PrometheusBackend("r2", "127.0.0.1", 0, None, expert_series_limit=4)
    try:
        exp.log(record(layers=2, experts=4), step=1)
        text = scrape(exp.address)
        assert "raymoe_moe_imbalance{" in text and "raymoe_moe_expert_tokens{" not in text
        assert "exceeds metrics.expert_series_limit=4" in capsys.readouterr().out
    finally:
        exp.close()


def test_port_in_use_or_unwritable_dir_warns_and_training_goes_on(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = MetricsConfig(port=port)
        logger = build_metrics(cfg, "r3", tmp_path / "run", tmp_path, rank=0)
    assert logger.prometheus is None
    assert f"metrics exporter could not start on 127.0.0.1:{port}" in capsys.readouterr().err
    logger.log({"loss": 1.0}, 1)  # the file backend still works
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["loss"] == 1.0
    blocker = tmp_path / "file"
    blocker.write_text("")
    logger = build_metrics(MetricsConfig(prometheus=False), "r4", blocker / "run", tmp_path, rank=0)
    logger.log({"loss": 1.0}, 1)
    assert "cannot write metrics to" in capsys.readouterr().err
    assert build_metrics(cfg, "r5", tmp_path, tmp_path, rank=1).backends == []  # only rank 0 exports


def dashboard_series() -> set[str]:
    dash = json.loads((MONITORING / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs and all(p.get("title") for p in dash["panels"])
    return {name for e in exprs for name in re.findall(r"raymoe_[a-z_]+", e)}


def test_dashboard_queries_name_only_exported_series(tmp_path):
    exp = PrometheusBackend("r6", "127.0.0.1", 0, None, expert_series_limit=256)
    try:
        exp.log(record(), step=3)
        live = set(re.findall(r"^(raymoe_[a-z_]+)\{", scrape(exp.address), re.M))
    finally:
        exp.close()
    assert dashboard_series() <= live, dashboard_series() - live


def test_shipped_scrape_config_is_valid_yaml_with_file_sd():
    cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["raymoe"]["file_sd_configs"][0]["files"] == ["../../runs/prometheus_targets/*.json"]


# ----------------------------------------------------------------------- a real Prometheus server

def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        msg = "Prometheus server not installed: `apt-get install prometheus` (Debian) or put it on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " (CI must have it: .ci/run installs it)")
        pytest.skip(msg)
    return path


def prom_query(base: str, query: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


@pytest.fixture
def prometheus_server(tmp_path):
    binary = prometheus_binary()
    targets = tmp_path / "targets"
    targets.mkdir()
    cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s")
    raymoe = next(j for j in cfg["scrape_configs"] if j["job_name"] == "raymoe")
    raymoe["file_sd_configs"] = [{"files": [str(targets / "*.json")], "refresh_interval": "1s"}]
    cfg["scrape_configs"] = [raymoe]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={tmp_path / 'data'}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                time.sleep(0.2)
        yield base, targets
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.ray
def test_prometheus_scrapes_a_live_moe_run(ray_cluster, tiny_data, tmp_path, prometheus_server):
    from cluster.train.driver import fit
    from tests.test_ray_train import debug_overrides

    base, targets = prometheus_server
    job = load_config("moe_debug", debug_overrides(tiny_data, tmp_path, "prom") + [
        "train.steps=6", "parallel.ep=2", f"metrics.file_sd_dir={targets}", "metrics.linger_s=20"])
    summary = fit(job)
    expected = {"raymoe_loss": summary["final_train_loss"], "raymoe_val_loss": summary["last_val_loss"],
                "raymoe_aux_loss": summary["final_aux_loss"], "raymoe_step": 6.0}
    got = {}
    # The exporter is gone after the run, so its series are stale: ask for the last sample.
    for _ in range(30):  # ingestion lags the scrape by a few seconds
        got = {name: prom_query(base, f'last_over_time({name}{{run="prom"}}[10m])') for name in expected}
        if all(got.values()):
            break
        time.sleep(0.5)
    for name, value in expected.items():
        assert got[name], f"{name} never reached Prometheus"
        assert float(got[name][0]["value"][1]) == pytest.approx(value, rel=1e-6), name
    url = f"{base}/api/v1/series?" + urllib.parse.urlencode(
        {"match[]": '{__name__=~"raymoe_.+", run="prom"}', "start": time.time() - 600})
    with urllib.request.urlopen(url, timeout=10) as r:
        names = {m["__name__"] for m in json.loads(r.read())["data"]}
    assert dashboard_series() <= names, dashboard_series() - names  # every dashboard query has data
    layers = prom_query(base, 'last_over_time(raymoe_moe_imbalance{run="prom"}[10m])')
    assert sorted(r["metric"]["layer"] for r in layers) == ["0", "1"]


# ----------------------------------------------------------------------------------------- plots

def test_report_writes_pngs_and_rejects_a_run_without_metrics(tmp_path):
    from cluster.train.report import report
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="has no metrics"):
        report(run)
    rec = record()
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "val_loss": 3.0}) + "\n")
        for step in range(1, 6):
            f.write(json.dumps({**rec, "step": step}) + "\n")
    paths = report(run)
    assert [p.name for p in paths] == ["loss.png", "expert_load_layer0.png", "expert_load_layer1.png", "balance.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


# ------------------------------------------------------------------------------ MFU denominator

@pytest.mark.parametrize("device_name, entry, tflops", [
    ("NVIDIA A100-SXM4-80GB", "A100", 312), ("NVIDIA A100 80GB PCIe", "A100", 312),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989), ("NVIDIA H100 PCIe", "H100 PCIe", 756),
    ("NVIDIA H100 NVL", "H100 NVL", 835), ("NVIDIA H200", "H200", 989), ("NVIDIA H200 NVL", "H200 NVL", 835),
    ("NVIDIA B200", "B200", 2250), ("NVIDIA GB200", "GB200", 2500),
    ("NVIDIA H800", "H800", 989), ("NVIDIA H800 PCIe", "H800 PCIe", 756), ("NVIDIA A800-SXM4-80GB", "A800", 312),
    ("NVIDIA L40S", "L40S", 362), ("NVIDIA L4", "L4", 121),
])
def test_mfu_peak_comes_from_the_datasheet_table_by_device_name(device_name, entry, tflops):
    from cluster.train.metrics import known_accelerator, peak_flops

    assert known_accelerator(device_name).name == entry
    peak = peak_flops("cpu", device_name=device_name)  # the name decides, not the device type
    assert (peak.basis, round(peak.flops / 1e12)) == ("datasheet", tflops) and "datasheet" in peak.what


def test_mfu_peak_configured_wins_and_cpu_is_labelled_measured():
    from cluster.train.metrics import known_accelerator, peak_flops

    assert peak_flops("cpu", configured=123e12, device_name="NVIDIA H100 80GB HBM3").basis == "configured"
    assert known_accelerator("NVIDIA A10") is None and known_accelerator("Tesla V100-SXM2-16GB") is None
    cpu = peak_flops("cpu")
    assert cpu.basis == "measured" and cpu.flops > 0 and "measured" in cpu.what
