"""`ray_cluster.yaml` is a valid Ray cluster launcher config and keeps the cluster private."""
import json
from pathlib import Path

import jsonschema
import ray
import yaml

from tests.conftest import REPO


def load():
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_validates_against_the_schema_shipped_with_ray():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load(), schema)


def test_autoscaling_layout():
    cfg = load()
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # the head trains nothing
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert any(v["resources"].get("GPU", 0) > 0 and v["min_workers"] < v["max_workers"] for v in workers.values())
    assert cfg["idle_timeout_minutes"] > 0
    assert any("pip install" in c and "~/raymoe" in c for c in cfg["setup_commands"])  # this checkout's version
    assert cfg["file_mounts"]["~/raymoe"] == "."


def test_nothing_is_exposed_publicly():
    cfg = load()
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd and "--metrics-export-port" in head_cmd
    assert "--num-cpus=0" in head_cmd
    for rule in cfg["provider"]["security_group"]["IpPermissions"]:
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", []))
    for cmd in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]:
        assert "export RAY_AUTH_MODE=token;" in cmd  # token authentication stays on
    assert "~/.ray/auth_token" in cfg["file_mounts"]
