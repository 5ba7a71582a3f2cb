"""A run whose data and checkpoints live in a bucket (moto's S3 API on 127.0.0.1), on the session's
Ray: prepare into the bucket, train 2 workers, kill one, resume from the bucket on the same loss
curve; a corrupt checkpoint object falls back to the previous one (on 1 worker: an elastic resize
read back from the bucket); generation reads the run from its URI; no secret in the run's files."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cluster import checkpoint
from cluster.data import storage
from cluster.train.driver import read_metrics, step_losses
from tests.conftest import REPO
from tests.storage_server import BUCKET, SECRET
from tests.test_ray_train import STEPS, debug_overrides

pytestmark = pytest.mark.ray

DATA = f"s3://{BUCKET}/data/pydoc-64"
RUNS = f"s3://{BUCKET}/runs"


def run_job(env, *args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train_cmd(name, *extra):
    overrides = debug_overrides(DATA, RUNS, name) + ["train.checkpoint_interval=5", *extra]
    return ["-m", "jobs.train", "--config", "debug"] + [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def env(ray_cluster, s3, tmp_path_factory):
    """Credentials and endpoint only in the subprocesses' environment; a small text corpus
    prepared straight into the bucket."""
    env = {**ray_cluster["env"], **s3.env, "RAY_ADDRESS": ray_cluster["address"]}
    src = tmp_path_factory.mktemp("corpus")
    from pydoc_data.topics import topics

    for key in sorted(topics)[:120]:
        (src / f"{key}.txt").write_text(topics[key])
    r = run_job(env, "-m", "jobs.prepare_data", "--engine", "local", "--source", str(src), "--out", DATA,
                "--seq-len", "64")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"wrote      {DATA}" in r.stdout
    return env


@pytest.fixture(scope="module")
def straight(env):
    r = run_job(env, *train_cmd("straight"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"[raymoe] run stored at {RUNS}/straight" in r.stdout
    return step_losses(read_metrics(f"{RUNS}/straight"))


def test_a_run_in_the_bucket_survives_a_killed_worker_on_the_same_curve(env, straight, ray_cluster):
    from ray.util.state import list_actors

    assert sorted(straight) == list(range(1, STEPS + 1))
    proc = subprocess.Popen([sys.executable, *train_cmd("faulty", "train.eval_interval=1", "cluster.max_failures=1")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    snapshot = storage.locate(f"{RUNS}/faulty/checkpoint_manager_snapshot.json")
    deadline = time.time() + 240
    while not (snapshot.exists() and checkpoint.PREFIX in snapshot.read_text()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    os.kill(workers[0].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    records = read_metrics(f"{RUNS}/faulty")
    starts = [r for r in records if r.get("event") == "launch_start"]
    assert len(starts) == 2 and starts[0]["resumed_from"] == 0 and starts[1]["resumed_from"] >= 5
    got = step_losses(records)
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [straight[s] for s in range(1, STEPS + 1)],
                               rtol=0, atol=1e-4)
    assert SECRET not in out


def test_generate_reads_the_run_from_its_uri_and_no_secret_is_stored(env, straight):
    r = run_job(env, "-m", "jobs.generate", f"{RUNS}/straight", "--prompt", "The ", "--max-new-tokens", "8",
                "--seed", "1", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("The ")
    bucket = storage.locate(f"s3://{BUCKET}")
    files = bucket.files()
    assert any(rel.endswith("config.yaml") for rel, _ in files) and any(rel.endswith("metrics.jsonl") for rel, _ in files)
    for rel, _ in files:
        assert SECRET.encode() not in bucket.join(rel).read_bytes(), rel


def test_a_corrupt_checkpoint_object_falls_back_to_the_previous_one_on_another_worker_count(env, straight):
    # Last: the rerun re-saves checkpoint_20 on 1 worker into the directory of the 2-worker one
    # (its stale rank-1 files then make it incomplete, on disk as in a bucket: a known limitation).
    run = storage.locate(f"{RUNS}/straight")
    assert [c.name for c in checkpoint.list_checkpoints(run)] == [checkpoint.dir_name(STEPS), checkpoint.dir_name(15)]
    latest = run.join(checkpoint.dir_name(STEPS))
    shard = next(rel for rel, _ in latest.files() if rel.endswith(".distcp"))
    data = bytearray(latest.join(shard).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, wrong content
    latest.join(shard).write_bytes(bytes(data))
    r = run_job(env, *train_cmd("straight", "cluster.num_workers=1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"checkpoint {latest.uri} is corrupt" in r.stdout + r.stderr
    records = read_metrics(run)
    starts = [x for x in records if x.get("event") == "launch_start"]
    assert starts[-1]["resumed_from"] == 15 and starts[-1]["world_size"] == 1
    got = step_losses(records)  # steps 16..20 retrained on 1 worker: the same values
    np.testing.assert_allclose([got[s] for s in range(16, STEPS + 1)], [straight[s] for s in range(16, STEPS + 1)],
                               rtol=0, atol=1e-5)
