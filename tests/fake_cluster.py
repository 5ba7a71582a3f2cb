"""An autoscaling Ray cluster on this one machine, made from `ray_cluster.yaml` itself.

Ray's fake multi-node provider starts each "cloud node" as a raylet process here. The node types
are the cluster file's, with resources scaled down to this machine (a GPU worker becomes a
1-CPU worker); the head keeps `CPU: 0`, so every training worker needs a node the autoscaler
adds. The wheel lacks the provider's example config, so the whole config is written here.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from tests.conftest import REPO, VENV_BIN, ensure_ray_token, env_with_venv, free_port, stop_cluster


def fake_cluster_config(gcs_address: str, worker_cpus: int = 1, max_nodes: int = 2) -> dict:
    """`ray_cluster.yaml` with the provider swapped for the fake one and resources scaled down."""
    real = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    head_type = real["head_node_type"]
    types = {}
    for name, spec in real["available_node_types"].items():
        if name == head_type:
            continue
        types[name] = {"node_config": {}, "resources": {"CPU": worker_cpus},  # a GPU node -> a CPU node
                       "min_workers": spec["min_workers"], "max_workers": min(spec["max_workers"], max_nodes)}
    types["ray.head.default"] = {"node_config": {}, "resources": dict(real["available_node_types"][head_type]["resources"]),
                                 "max_workers": 0}
    return {
        "cluster_name": "raymoe-fake",
        "max_workers": max_nodes,
        "upscaling_speed": real["upscaling_speed"],
        "idle_timeout_minutes": real["idle_timeout_minutes"],
        "provider": {"type": "external", "module": "tests.fake_provider.LocalNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeCluster:
    """`ray start --head --autoscaling-config=...` with RAY_FAKE_CLUSTER=1, on 127.0.0.1."""

    def __init__(self, tmp: Path, max_nodes: int = 2):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path("/tmp") / f"raymoe-fake-{os.getpid()}"
        self.config = fake_cluster_config(self.address, max_nodes=max_nodes)
        self.config_path = tmp / "fake_cluster.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.hold_file = tmp / "hold_launches"  # while it exists, the "cloud" launches no node
        self.env = env_with_venv()
        self.env.update(RAY_FAKE_CLUSTER="1", RAY_ADDRESS=self.address,
                        PYTHONPATH=str(REPO),  # the autoscaler imports tests.fake_provider
                        AUTOSCALER_UPDATE_INTERVAL_S="1",  # the monitor reacts within a second
                        AUTOSCALER_HEARTBEAT_TIMEOUT_S="5",  # a silent node is replaced after 5 s
                        RAYMOE_FAKE_HOLD_LAUNCHES=str(self.hold_file))

    def start(self) -> None:
        ensure_ray_token()
        head = self.config["available_node_types"]["ray.head.default"]["resources"]
        cmd = [os.path.join(VENV_BIN, "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
               f"--port={self.port}", f"--num-cpus={head.get('CPU', 0)}", "--num-gpus=0",
               f"--autoscaling-config={self.config_path}", f"--temp-dir={self.temp}",
               # Ray Train's state queries go through the dashboard: keep it, on loopback.
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
               "--disable-usage-stats",
               # A node whose raylet stops answering is declared dead after ~3 s (default ~15 s).
               '--system-config={"health_check_period_ms":1000,"health_check_failure_threshold":3}']
        env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}  # the head is this address
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if out.returncode:
            raise RuntimeError(f"`ray start --head` of the fake cluster failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")

    def nodes(self) -> list[dict]:
        """Alive nodes as Ray sees them (through a short-lived driver, not this test process)."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps([{k: n[k] for k in ('NodeID', 'Alive', 'Resources', 'NodeManagerAddress')} "
                "for n in ray.nodes()]))" % self.address)
        out = subprocess.run([os.path.join(VENV_BIN, "python"), "-c", code], env=self.env, capture_output=True,
                             text=True, timeout=60, check=True)
        return [n for n in json.loads(out.stdout.strip().splitlines()[-1]) if n["Alive"]]

    def worker_raylets(self) -> dict[str, int]:
        """{fake node id: raylet pid} of the nodes the fake provider launched."""
        found = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                if not cmdline[0].endswith(b"raylet"):
                    continue
                env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
            except (OSError, IndexError):
                continue
            node = env.get(b"RAY_OVERRIDE_NODE_ID_FOR_TESTING")
            if node and node.decode() != FAKE_HEAD_NODE_ID and str(self.temp).encode() in b" ".join(cmdline):
                found[node.decode()] = int(proc.name)
        return found

    def kill_node(self, node_id: str) -> None:
        """Lose a node the way a reclaimed spot instance does: its raylet and every process it
        started (the training worker on it) die at once, without notice."""
        raylet = self.worker_raylets()[node_id]
        doomed = [raylet] + [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == raylet]
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        stop_cluster(self.temp)


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
