"""A cluster that autoscales, loses a node and gets it back, on this one machine.

Ray's fake multi-node provider plays the cloud: the node types are `ray_cluster.yaml`'s (a GPU
node becomes a 1-CPU node), the head trains nothing, so every worker runs on a node the
autoscaler adds. One elastic MoE run (EP=2 at 2 workers) goes through the whole story: nodes
are added on demand, one is lost (its raylet and its worker killed without notice), the run
continues on 1 worker (EP=1, twice the micro-batches per worker), the autoscaler replaces the
node, the run grows back to 2 workers, and every step's loss equals an uninterrupted run's.
Bad input (unreachable address, more workers or GPUs than any node type can hold) fails fast.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.train.capacity import NodeType, check_capacity, node_types_from_config
from cluster.config.job import load_config
from cluster.config.typed import ConfigError
from cluster.train.driver import fit, read_metrics, step_losses
from tests.conftest import REPO, free_port
from tests.fake_cluster import FakeCluster, wait_for

pytestmark = pytest.mark.ray

# On 1 worker an expert's weight gradient sums the two micro-batches' tokens in two matmuls instead
# of one, so the weights differ from the 2-worker run's in the last bits; training amplifies
# that, and a top-k choice between two near-equal scores eventually flips (a 2-worker and an
# elastic 60-step run at lr 3e-3 with capacity dropping parted by 1e-4 at step 25, 13 steps
# after the regrowth). So this run is short, dropless and at a gentler rate.
STEPS = 30
# Seconds per step while the test keeps a pace file: the tiny run outlives a node loss and return.
PACE_S, PACE_ONE_WORKER_S = "0.3", "2.0"


def elastic_overrides(data, storage, name):
    return [f"data.path={data}", "data.builtin=null", f"cluster.storage_path={storage}", f"cluster.run_name={name}",
            f"train.steps={STEPS}", "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=4",
            "train.eval_interval=0", "train.checkpoint_interval=4", "train.log_interval=4",
            "parallel.ep=auto", "cluster.num_workers=2", "metrics.prometheus=false",
            "model.moe.capacity_factor=null", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    cluster = FakeCluster(tmp_path_factory.mktemp("fake"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_autoscaling_node_loss_and_elastic_regrowth(fake_cluster, ray_cluster, tiny_data, tmp_path):
    fc = fake_cluster
    head_only = fc.nodes()
    assert not fc.worker_raylets()
    assert len(head_only) == 1 and head_only[0]["Resources"].get("CPU", 0) == 0  # the head trains nothing

    pace = tmp_path / "pace"
    pace.write_text(PACE_S)
    env = dict(fc.env, RAYMOE_TEST_PACE_FILE=str(pace),
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10")  # a group that cannot be placed gives up in 10 s
    args = elastic_overrides(tiny_data, tmp_path, "elastic") + [
        "cluster.min_workers=1", "cluster.max_failures=6", "cluster.resize_interval_s=2",
        f"cluster.autoscaling_config={fc.config_path}"]
    cmd = [sys.executable, "-m", "jobs.train", "--config", "moe_debug"] + [a for s in args for a in ("--set", s)]
    log = (tmp_path / "driver.log").open("w")
    t0 = time.time()
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "elastic"
    timeline = {"requested": 0.0}

    def launches():
        return [r for r in read_metrics(run_dir) if r.get("event") == "launch_start"]

    def alive(what):
        assert driver.poll() is None, f"the elastic run ended early ({what}); see {tmp_path / 'driver.log'}"

    # The uninterrupted reference, on the session's cluster, while the elastic run goes on (that
    # one sleeps between steps, so the two hardly compete for the CPUs).
    ref_args = elastic_overrides(tiny_data, tmp_path, "reference") + ["train.checkpoint_interval=100"]
    ref_cmd = [sys.executable, "-m", "jobs.train", "--config", "moe_debug"] + [a for s in ref_args for a in ("--set", s)]
    ref = subprocess.Popen(ref_cmd, cwd=REPO, env=dict(ray_cluster["env"], RAY_ADDRESS=ray_cluster["address"]),
                           stdout=(tmp_path / "reference.log").open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: alive("autoscaling") or fc.worker_raylets(), 120, "the autoscaler to add nodes")
        timeline["node_added"] = time.time() - t0
        first = wait_for(lambda: alive("start") or [r for r in launches() if r["world_size"] == 2], 120,
                         "training on 2 workers")[0]
        timeline["running_2_workers"] = first["time"] - t0
        added = set(fc.worker_raylets()) - {n["NodeID"] for n in head_only}
        assert len(added) == 2 and set(first["nodes"]) == added  # one worker on each new node
        assert first["layout"]["ep"] == 2

        wait_for(lambda: alive("first steps") or max(step_losses(read_metrics(run_dir)) or [0]) >= 6, 120,
                 "the first checkpoint")
        victim = first["nodes"][1]
        fc.hold_file.touch()  # out of capacity: no replacement until the run went on without the node
        fc.kill_node(victim)
        timeline["node_killed"] = time.time() - t0
        steps_before = max(step_losses(read_metrics(run_dir)))

        shrunk = wait_for(lambda: alive("shrink") or [r for r in launches() if r["world_size"] == 1], 150,
                          "the run to continue on 1 worker")[0]
        again = wait_for(lambda: [r for r in read_metrics(run_dir) if "loss" in r and r["time"] > shrunk["time"]],
                         60, "a step on 1 worker")[0]
        timeline["running_1_worker"] = again["time"] - t0
        assert shrunk["layout"]["ep"] == 1 and victim not in shrunk["nodes"]
        pace.write_text(PACE_ONE_WORKER_S)
        fc.hold_file.unlink()  # capacity is back: the autoscaler replaces the lost node
        timeline["capacity_back"] = time.time() - t0

        grown = wait_for(lambda: alive("grow") or [r for r in launches() if r["world_size"] == 2 and r["time"] > shrunk["time"]],
                         150, "the run to grow back to 2 workers")[0]
        timeline["running_2_workers_again"] = grown["time"] - t0
        pace.unlink()  # let it finish at full speed
        assert victim not in grown["nodes"] and grown["layout"]["ep"] == 2
        assert driver.wait(timeout=180) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        assert ref.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        for proc in (driver, ref):
            if proc.poll() is None:
                proc.kill()
        log.close()

    records = read_metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2
    got, want = step_losses(records), step_losses(read_metrics(tmp_path / "reference"))
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst < 1e-4, f"elastic run departs from the uninterrupted one by {worst:.2e}"
    timeline.update(kill_to_training_s=timeline["running_1_worker"] - timeline["node_killed"],
                    steps_lost=steps_before - shrunk["resumed_from"], worst_loss_diff=worst,
                    launches=[(r["resumed_from"], r["world_size"]) for r in launches()])
    (tmp_path / "timeline.json").write_text(json.dumps(timeline, indent=1))
    print("\nautoscaling/elastic timeline (s from the job's start):", json.dumps(timeline, indent=1))
    alive_now = {n["NodeID"] for n in fc.nodes()}
    assert victim not in alive_now and len(alive_now) == 3  # the lost node was replaced by a new one


def test_a_job_no_node_type_can_hold_fails_before_it_starts(fake_cluster, tiny_data, tmp_path):
    """3 workers on a cluster whose node types hold 2; a GPU job on a cluster without GPU types."""
    args = elastic_overrides(tiny_data, tmp_path, "too-big") + [f"cluster.autoscaling_config={fake_cluster.config_path}"]
    for extra, message in ((["cluster.num_workers=3", "train.global_batch_size=6"], "can hold at most 2"),
                           (["cluster.use_gpu=true"], "needs a GPU")):
        cmd = [sys.executable, "-m", "jobs.train", "--config", "moe_debug"] + [
            a for s in args + extra for a in ("--set", s)]
        t = time.monotonic()
        out = subprocess.run(cmd, cwd=REPO, env=fake_cluster.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert message in out.stderr and "cluster config" in out.stderr
        assert time.monotonic() - t < 60  # not the placement group's endless wait
        assert not (tmp_path / "too-big").exists()  # nothing written for a job that cannot run


def test_unreachable_address_fails_fast_with_the_fix(tiny_data, tmp_path):
    from jobs.train import main

    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    args = elastic_overrides(tiny_data, tmp_path, "nowhere") + [f"cluster.address={dead}"]
    with pytest.raises(ConfigError, match=r"cluster.address: cannot reach a Ray cluster at 127.0.0.1:\d+ .*ray up"):
        fit(load_config("moe_debug", args))
    assert main(["--config", "moe_debug"] + [a for s in args for a in ("--set", s)]) == 2
    assert not (tmp_path / "nowhere").exists()


def test_capacity_against_the_cluster_file_node_types():
    types = node_types_from_config(REPO / "ray_cluster.yaml")
    assert {t.name for t in types} == {"head", "gpu_worker"}
    ok = load_config("debug", ["cluster.use_gpu=true", "cluster.num_workers=32", "train.global_batch_size=64",
                               "train.micro_batch_size=2"]).cluster
    check_capacity(ok, types)  # 8 nodes x 4 GPUs
    too_many = load_config("debug", ["cluster.use_gpu=true", "cluster.num_workers=33", "train.global_batch_size=66",
                                     "train.micro_batch_size=2"]).cluster
    with pytest.raises(ConfigError, match=r"cluster.num_workers: .* at most 32 .*gpu_worker \(CPU 48, GPU 4, max 8"):
        check_capacity(too_many, types)
    fat = load_config("debug", ["cluster.cpus_per_worker=64"]).cluster
    with pytest.raises(ConfigError, match=r"no node type of this cluster has that.*lower cluster.cpus_per_worker"):
        check_capacity(fat, types)
    assert NodeType("x", {"CPU": 8, "GPU": 2}, None).workers({"CPU": 1, "GPU": 1}) == 2
