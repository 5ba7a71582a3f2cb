"""Fail in seconds when a job cannot run on the cluster it was sent to.

Ray itself waits: `ray.init` retries an address that does not answer, and a placement group no
node can hold stays pending forever (the autoscaler only logs it as infeasible). These checks
run on the driver before the trainer starts, and say what to change.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.config.job import ClusterConfig
from cluster.config.typed import ConfigError

GCS_PORT = 6379  # `ray start --head` default
CLIENT_PORT = 10001  # Ray Client (ray://) default


def check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Raise ConfigError if `address` (or RAY_ADDRESS) names a host:port that does not accept a
    TCP connection within `timeout_s`. "auto", "local" and no address at all are not checked."""
    field = "cluster.address"
    if not address:
        address, field = os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS"
    if not address or address in ("auto", "local"):
        return
    rest, default_port = address, GCS_PORT
    for scheme, port in (("ray://", CLIENT_PORT), ("http://", 8265), ("https://", 443)):
        if rest.startswith(scheme):
            rest, default_port = rest[len(scheme):], port
    hostport = rest.split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep:
        host, port = hostport, ""
    try:
        with socket.create_connection((host.strip("[]"), int(port or default_port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ConfigError(
            f"{field}: cannot reach a Ray cluster at {address} ({reason}). Start it (`ray up ray_cluster.yaml` "
            f"for the cloud, `ray start --head` here), fix {field}, or leave both cluster.address and RAY_ADDRESS "
            "unset to train on an embedded local Ray") from None


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_nodes: int | None  # None = unbounded

    def workers(self, need: dict[str, float]) -> int:
        """How many workers needing `need` fit on one node of this type."""
        fits = [math.floor(self.resources.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
        return min(fits) if fits else 0

    def describe(self) -> str:
        res = ", ".join(f"{k} {v:g}" for k, v in sorted(self.resources.items()) if k in ("CPU", "GPU"))
        return f"{self.name} ({res or 'no CPU/GPU'}" + (f", max {self.max_nodes} nodes)" if self.max_nodes is not None else ")")


def node_types_from_config(path: str | Path) -> list[NodeType] | None:
    """Node types of a cluster launcher / autoscaler config, or None if there is no such file."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    head = cfg.get("head_node_type")
    types = []
    for name, spec in (cfg.get("available_node_types") or {}).items():
        count = 1 if name == head else spec.get("max_workers", cfg.get("max_workers"))
        types.append(NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()}, count))
    return types


def node_types_alive() -> list[NodeType]:
    """Every node alive now, each as a type of one node (a cluster without an autoscaler)."""
    import ray

    return [NodeType(n["NodeManagerAddress"] + "/" + n["NodeID"][:8], dict(n["Resources"]), 1)
            for n in ray.nodes() if n["Alive"]]


def on_this_machine() -> bool:
    """True if every node of the connected cluster runs where this driver runs (a laptop or a
    single-machine cluster, which cannot grow unless it says so in an autoscaling config)."""
    import ray

    here = ray.util.get_node_ip_address()
    return all(n["NodeManagerAddress"] == here for n in ray.nodes() if n["Alive"])


def check_capacity(c: ClusterConfig, types: list[NodeType]) -> None:
    """Raise ConfigError if no node type holds one worker, or all of them together hold fewer
    than the smallest world size the job accepts."""
    need = {"CPU": c.cpus_per_worker, **({"GPU": 1.0} if c.use_gpu else {})}
    want = c.min_workers or c.num_workers
    kinds = "; ".join(t.describe() for t in types) or "none"
    per_type = [(t, t.workers(need)) for t in types]
    if not any(n for _, n in per_type):
        what = "a GPU" if c.use_gpu else f"{c.cpus_per_worker:g} CPUs"
        fix = ("set cluster.use_gpu: false, or add a GPU node type to the cluster config" if c.use_gpu else
               "lower cluster.cpus_per_worker, or add a node type with more CPUs")
        raise ConfigError(f"cluster.use_gpu/cpus_per_worker: each worker needs {what} "
                          f"({', '.join(f'{k} {v:g}' for k, v in need.items())}), but no node type of this cluster "
                          f"has that (node types: {kinds}); {fix}")
    if any(t.max_nodes is None and n for t, n in per_type):
        return
    most = sum(n * t.max_nodes for t, n in per_type)
    if most < want:
        field = "cluster.min_workers" if c.min_workers else "cluster.num_workers"
        raise ConfigError(f"{field}: the job needs at least {want} workers of {need}, but this cluster can hold at "
                          f"most {most} (node types: {kinds}); lower {field} (or give cluster.min_workers an elastic "
                          "range), or raise max_workers of a node type in the cluster config")


def check_cluster(c: ClusterConfig) -> None:
    """After `ray.init`: the job's workers fit the node types of the cluster's autoscaling
    config, or, on a single-machine cluster without one, the nodes alive now. A remote cluster
    without a readable config is not checked (its autoscaler may add nodes of unknown types)."""
    types = node_types_from_config(c.autoscaling_config) if c.autoscaling_config else None
    if types is None:
        if not on_this_machine():
            return  # a remote cluster may still add nodes of types not known here
        types = node_types_alive()
    check_capacity(c, types)
