"""End to end on the session's local Ray: a 2-worker run, exact resume on another worker count,
refusal to resume onto another model, generation from the run, and `ray job submit`."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cluster import checkpoint
from cluster.config.job import load_config
from cluster.train.driver import fit, read_metrics, step_losses
from tests.conftest import REPO

__all__ = ["debug_job", "debug_overrides"]

pytestmark = pytest.mark.ray

STEPS = 20
HALF = STEPS // 2


def debug_overrides(data, storage, name):
    return [f"data.path={data}", "data.builtin=null", f"cluster.storage_path={storage}",
            f"cluster.run_name={name}", f"train.steps={STEPS}", "train.warmup_steps=2",
            "train.eval_interval=10", "train.checkpoint_interval=10", "train.log_interval=5",
            "train.global_batch_size=8", "train.micro_batch_size=2", "cluster.keep_checkpoints=2"]


def debug_job(data, storage, name, *extra):
    return load_config("debug", debug_overrides(data, storage, name) + list(extra))


@pytest.fixture(scope="module")
def straight(ray_cluster, tiny_data, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    summary = fit(debug_job(tiny_data, storage, "straight"))
    return storage, summary


def test_two_worker_run_end_to_end(straight):
    storage, summary = straight
    run_dir = storage / "straight"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == STEPS
    for key in ("final_train_loss", "first_val_loss", "last_val_loss", "tokens_per_s", "wall_s"):
        assert isinstance(on_disk[key], float) and np.isfinite(on_disk[key]), key
    assert on_disk["world_size"] == 2
    assert on_disk["last_val_loss"] < on_disk["first_val_loss"]
    assert sorted(step_losses(read_metrics(run_dir))) == list(range(1, STEPS + 1))
    records = read_metrics(run_dir)
    launch = next(r for r in records if r.get("event") == "launch_start")
    assert launch["peak_basis"] == "measured" and launch["peak_flops"] == launch["achievable_flops"] > 0  # CPU
    windows = [r for r in records if "mfu" in r]
    assert windows and all(r["mfu_basis"] == "measured" and r["mfu"] == r["mfu_achievable"] > 0 for r in windows)
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == [checkpoint.dir_name(STEPS), checkpoint.dir_name(HALF)]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer" / "meta.json").is_file()


def test_generate_from_the_run(straight):
    storage, _ = straight
    r = subprocess.run([sys.executable, "-m", "jobs.generate", str(storage / "straight"), "--prompt", "The ",
                        "--max-new-tokens", "20", "--seed", "1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The ")
    produced = int(re.search(r"# (\d+) tokens in", r.stderr).group(1))  # fewer if it sampled end-of-text
    assert 1 <= produced <= 20


@pytest.fixture(scope="module")
def resumed(straight, tiny_data):
    """One run stopped at step 15 on 2 workers (checkpoints 10 and 15), its latest checkpoint then
    silently corrupted, and the same run name resumed on 1 worker to the end: the subject of both
    the resume and the fallback tests (two Ray runs where each test had two of its own)."""
    storage, _ = straight
    first = fit(debug_job(tiny_data, storage, "resumed", "train.checkpoint_interval=5", "train.stop_at_step=15"))
    assert first["steps"] == 15 and first["world_size"] == 2
    shard = next((storage / "resumed" / checkpoint.dir_name(15)).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a silently corrupted byte: same size, wrong content
    shard.write_bytes(bytes(data))
    # Same run name, half the workers: same global batch, twice the accumulation steps.
    second = fit(debug_job(tiny_data, storage, "resumed", "train.checkpoint_interval=5", "cluster.num_workers=1"))
    records = read_metrics(storage / "resumed")
    ref = step_losses(read_metrics(storage / "straight"))
    return second, records, ref


def test_resume_continues_the_same_curve_on_another_worker_count(resumed):
    second, records, ref = resumed
    assert second["steps"] == STEPS and second["world_size"] == 1
    starts = [r for r in records if r.get("event") == "launch_start"]
    assert [r["world_size"] for r in starts] == [2, 1]
    got = step_losses(records)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [ref[s] for s in range(1, STEPS + 1)],
                               rtol=0, atol=1e-5)


def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(resumed):
    _, records, ref = resumed
    starts = [r for r in records if r.get("event") == "launch_start"]
    assert [r["resumed_from"] for r in starts] == [0, 10]  # step 10's checkpoint, not the damaged 15
    launches = [r for r in records if r.get("event") == "launch_end"]
    assert [r["steps_this_launch"] for r in launches] == [15, 10]
    got = step_losses(records)  # steps 11-15 re-run from step 10's state: their last values
    np.testing.assert_allclose([got[s] for s in range(HALF + 1, STEPS + 1)], [ref[s] for s in range(HALF + 1, STEPS + 1)],
                               rtol=0, atol=1e-5)


def test_worker_killed_after_a_checkpoint_restarts_once_on_the_same_curve(straight, tiny_data, ray_cluster):
    """A Ray Train worker process killed from outside (SIGKILL) after the first checkpoint: with
    cluster.max_failures=1 the group restarts once from the last checkpoint and finishes."""
    from ray.util.state import list_actors

    storage, _ = straight
    run_dir = storage / "faulty"
    overrides = debug_overrides(tiny_data, storage, "faulty") + [
        "train.checkpoint_interval=5", "train.eval_interval=1", "cluster.max_failures=1"]
    cmd = [sys.executable, "-m", "jobs.train", "--config", "debug"] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"]},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    # Ray's controller registers a reported checkpoint asynchronously: wait until its snapshot lists one.
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while not (snapshot.is_file() and checkpoint.PREFIX in snapshot.read_text()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    os.kill(workers[0].pid, signal.SIGKILL)
    killed_at = time.time()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    records = read_metrics(run_dir)
    starts = [r for r in records if r.get("event") == "launch_start"]
    assert len(starts) == 2 and starts[0]["resumed_from"] == 0 and starts[1]["resumed_from"] >= 5  # exactly one restart
    back = min(r["time"] for r in records if "loss" in r and r["time"] > killed_at)
    print(f"\n[fault] killed a worker at step <= {max(r['step'] for r in records if r['time'] < killed_at)}, "
          f"resumed from step {starts[1]['resumed_from']}, training again {back - killed_at:.1f} s after the kill")
    ref = step_losses(read_metrics(storage / "straight"))
    got = step_losses(records)
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [ref[s] for s in range(1, STEPS + 1)],
                               rtol=0, atol=1e-4)


def test_resume_onto_another_model_shape_is_refused_before_workers_start(straight, tiny_data):
    storage, _ = straight
    run_dir = storage / "straight"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if "checkpoint_" in str(p)}
    with pytest.raises(checkpoint.CheckpointError, match="different model .*d_model: checkpoint 32 vs config 64"):
        fit(debug_job(tiny_data, storage, "straight", "model.d_model=64"))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if "checkpoint_" in str(p)} == before


@pytest.fixture(scope="module")
def moe_ep2(ray_cluster, tiny_data, tmp_path_factory):
    """8 steps of the MoE debug model at EP=2 with DDP, checkpointed every 4: one run, both the
    EP test's subject and the FSDP test's reference."""
    storage = tmp_path_factory.mktemp("moe")
    summary = fit(load_config("moe_debug", debug_overrides(tiny_data, storage, "moe") +
                              ["train.steps=8", "parallel.ep=2", "train.checkpoint_interval=4"]))
    return storage / "moe", summary


def test_moe_transformer_trains_with_expert_parallelism_on_two_workers(moe_ep2):
    run_dir, summary = moe_ep2
    assert summary["steps"] == 8 and summary["last_val_loss"] < summary["first_val_loss"]
    assert summary["final_aux_loss"] > 0
    moe_records = [r for r in read_metrics(run_dir) if "moe" in r]
    assert moe_records and len(moe_records[-1]["moe"]) == 2  # both layers' statistics, reduced over ranks
    assert sum(moe_records[-1]["moe"][0]["tokens_per_expert"]) == 8 * 64 * 2  # global batch x seq x top-2


def test_fsdp_with_ep2_on_two_workers_resumes_without_fsdp_on_the_same_curve(moe_ep2, tiny_data, tmp_path):
    """`--set parallel.fsdp=true --set parallel.ep=2` through the job: 4 sharded steps, then the same
    run continued with DDP + EP=2 from the FSDP checkpoint, equal to 8 steps of DDP + EP=2."""
    ref_dir, _ = moe_ep2
    run = debug_overrides(tiny_data, tmp_path, "sharded") + ["train.steps=8", "parallel.ep=2", "train.checkpoint_interval=4"]
    fit(load_config("moe_debug", run + ["parallel.fsdp=true", "train.stop_at_step=4"]))
    fit(load_config("moe_debug", run))  # resumes at step 4 without FSDP
    ref, got = step_losses(read_metrics(ref_dir)), step_losses(read_metrics(tmp_path / "sharded"))
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)], rtol=0, atol=1e-4)
    launches = [r for r in read_metrics(tmp_path / "sharded") if r.get("event") == "launch_start"]
    assert [r["resumed_from"] for r in launches] == [0, 4]


def test_ray_job_stop_leaves_no_workers_and_a_resubmitted_job_resumes(ray_cluster, tiny_data, tmp_path):
    """The unchanged job under `ray job submit` (token authentication on) against `ray start --head`:
    stopped mid-run, then submitted again, waited for, and resumed to the end. (The second
    submission is also the plain submit-and-wait case, which had a test and a Ray run of its own.)"""
    from ray.util.state import list_actors

    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    addr = ["--address", ray_cluster["dashboard"]]
    overrides = debug_overrides(tiny_data, tmp_path, "stopped") + ["train.steps=30", "train.checkpoint_interval=5"]
    entry = ["python", "-m", "jobs.train", "--config", "debug"] + [a for o in overrides for a in ("--set", o)]
    # The first job sleeps 0.5 s after each step while the pace file exists, so the stop reaches it
    # mid-run; the file is gone before the second job, which runs at full speed.
    pace = tmp_path / "pace"
    pace.write_text("0.5")
    paced = ["--runtime-env-json", json.dumps({"env_vars": {"RAYMOE_TEST_PACE_FILE": str(pace)}})]

    def ray_job(*args, timeout=120):
        return subprocess.run([ray_bin, "job", *args], capture_output=True, text=True, timeout=timeout,
                              env=ray_cluster["env"], cwd=REPO)

    r = ray_job("submit", *addr, "--no-wait", "--submission-id", "raymoe-stop-1", "--working-dir", str(REPO), *paced,
                "--", *entry)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    snapshot = tmp_path / "stopped" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 180
    while not (snapshot.is_file() and checkpoint.PREFIX in snapshot.read_text()):
        assert time.time() < deadline, ray_job("logs", *addr, "raymoe-stop-1").stdout[-3000:]
        time.sleep(0.1)
    assert ray_job("stop", *addr, "raymoe-stop-1").returncode == 0
    status = ""
    for _ in range(120):
        status = ray_job("status", *addr, "raymoe-stop-1").stdout.lower()
        if "was stopped" in status:
            break
        time.sleep(0.5)
    assert "was stopped" in status, status
    for _ in range(60):  # no orphan training workers keep running (or holding CPUs)
        if not list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]):
            break
        time.sleep(0.5)
    assert not list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    stopped_at = max(step_losses(read_metrics(tmp_path / "stopped")))
    assert stopped_at < 30
    pace.unlink()

    r = ray_job("submit", *addr, "--submission-id", "raymoe-stop-2", "--working-dir", str(REPO), "--", *entry, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[raymoe] run finished" in r.stdout  # the job's own output comes back through `ray job submit`
    starts = [x for x in read_metrics(tmp_path / "stopped") if x.get("event") == "launch_start"]
    assert [s["resumed_from"] > 0 for s in starts] == [False, True]  # the second job resumed the run
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["steps"] == 30
