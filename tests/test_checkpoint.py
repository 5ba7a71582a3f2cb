"""Checkpoint files in one process: exact continuation, and clear errors that never destroy data."""
import json
import shutil

import numpy as np
import pytest
import torch

import archs
from archs.transformer import PRESETS, TransformerConfig
from cluster import checkpoint
from cluster.train.precision import DynamicLossScaler
from cluster.train.optim import build_optimizer, build_scheduler
from cluster.train.step import train_step
from tests.test_step import CPU, ArrayLM, global_batches

CFG = TransformerConfig(**PRESETS["debug"], vocab_size=50)


def fresh(seed=0):
    torch.manual_seed(seed)
    model = archs.build(CFG)
    opt = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
    return model, opt, build_scheduler(opt, 2, 8, 0.1)


def train(model, opt, sched, batches):
    losses = []
    for b in batches:
        losses.append(train_step(model, ArrayLM(), [b], opt, DynamicLossScaler(False), "fp32", CPU, 1.0).loss)
        sched.step()
    return losses


def save(path, model, opt, sched, step):
    checkpoint.save(path, model, opt, {"step": step, "samples": step * 8, "scheduler": sched.state_dict(),
                                       "scaler": DynamicLossScaler(False).state_dict()}, CFG, rank=0, world_size=1)


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    batches = global_batches(8)
    straight = train(*fresh(), batches)
    model, opt, sched = fresh()
    first = train(model, opt, sched, batches[:4])
    save(tmp_path / checkpoint.dir_name(4), model, opt, sched, 4)
    model2, opt2, sched2 = fresh(seed=123)  # different init: everything must come from the file
    state = checkpoint.load(tmp_path / checkpoint.dir_name(4), model2, opt2, CFG, rank=0, world_size=1)
    sched2.load_state_dict(state["scheduler"])
    assert state["step"] == 4 and state["samples"] == 32
    rest = train(model2, opt2, sched2, batches[4:])
    np.testing.assert_allclose(first + rest, straight, rtol=0, atol=1e-6)


def test_checkpoint_of_another_model_shape_is_refused_and_kept(tmp_path):
    model, opt, sched = fresh()
    path = tmp_path / checkpoint.dir_name(1)
    save(path, model, opt, sched, 1)
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    other = TransformerConfig(**{**PRESETS["debug"], "d_model": 64}, vocab_size=50)
    torch.manual_seed(0)
    big = archs.build(other)
    with pytest.raises(checkpoint.CheckpointError, match=r"different model \(d_model: checkpoint 32 vs config 64"):
        checkpoint.load(path, big, build_optimizer(big, 1e-3, 0, (0.9, 0.95)), other, 0, 1)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files


def test_incomplete_checkpoint_is_skipped_and_reported(tmp_path):
    model, opt, sched = fresh()
    good = tmp_path / checkpoint.dir_name(2)
    save(good, model, opt, sched, 2)
    # A crash while writing step 4: data files exist, meta.json (written last) does not.
    torn = tmp_path / checkpoint.dir_name(4)
    shutil.copytree(good, torn)
    (torn / "meta.json").unlink()
    assert checkpoint.latest_complete(tmp_path) == good
    with pytest.raises(checkpoint.CheckpointError, match="incomplete .*missing meta.json"):
        checkpoint.load(torn, *fresh()[:2], CFG, 0, 1)


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    model, opt, sched = fresh()
    path = tmp_path / checkpoint.dir_name(1)
    save(path, model, opt, sched, 1)
    for shard in path.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(checkpoint.CheckpointError, match="could not be read"):
        checkpoint.load_model_weights(path, archs.build(CFG), CFG)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="meta.json is corrupt"):
        checkpoint.read_meta(path)


def test_meta_records_model_and_layout(tmp_path):
    model, opt, sched = fresh()
    save(tmp_path / "c", model, opt, sched, 3)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 1 and meta["model"]["d_model"] == 32


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path):
    model, opt, sched = fresh()
    for step in (2, 4):
        save(tmp_path / checkpoint.dir_name(step), model, opt, sched, step)
    latest = tmp_path / checkpoint.dir_name(4)
    assert checkpoint.verify(latest)["step"] == 4
    shard = next(latest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="is corrupt: __0_0.distcp"):
        checkpoint.verify(latest)
    with pytest.warns(UserWarning, match="previous intact checkpoint checkpoint_00000002"):
        assert checkpoint.choose_resume(latest, tmp_path) == tmp_path / checkpoint.dir_name(2)
    assert checkpoint.latest_complete(tmp_path) == tmp_path / checkpoint.dir_name(2)
    assert shard.exists()  # the corrupt checkpoint is kept for inspection
    (tmp_path / checkpoint.dir_name(2) / "manifest_rank0.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no older intact checkpoint"):
        checkpoint.choose_resume(latest, tmp_path)


def test_a_truncated_file_fails_the_size_check_that_the_driver_makes(tmp_path):
    model, opt, sched = fresh()
    for step in (2, 4):
        save(tmp_path / checkpoint.dir_name(step), model, opt, sched, step)
    latest = tmp_path / checkpoint.dir_name(4)
    shard = next(latest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(checkpoint.CheckpointError, match=r"__0_0.distcp is missing or differs .*recorded"):
        checkpoint.verify(latest, contents=False)
    assert checkpoint.latest_complete(tmp_path, contents=False) == tmp_path / checkpoint.dir_name(2)


def _state(model, opt):
    return {k: v.clone() for k, v in model.state_dict().items()}, {
        k: ({n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()} if isinstance(v, dict) else v)
        for k, v in opt.state_dict()["state"].items()}


def test_a_checkpoint_in_a_bucket_loads_by_range_the_same_as_from_disk(tmp_path, s3, monkeypatch):
    """No download: each item is a ranged GET (retried through 2 connection resets), and a
    model-only load reads the model's bytes, not the optimizer state (2/3 of the shard bytes)."""
    from cluster.data import storage
    from tests.storage_server import BUCKET

    model, opt, sched = fresh()
    train(model, opt, sched, global_batches(2))
    local = tmp_path / checkpoint.dir_name(2)
    save(local, model, opt, sched, 2)
    remote = storage.locate(f"s3://{BUCKET}/ckpt-by-range/{checkpoint.dir_name(2)}")
    for f in local.iterdir():
        remote.join(f.name).write_bytes(f.read_bytes())
    from_disk, from_bucket = fresh(seed=1), fresh(seed=2)
    state_disk = checkpoint.load(local, from_disk[0], from_disk[1], CFG, 0, 1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.proxy.endpoint)
    s3.proxy.clear()
    s3.proxy.arm("reset", 2, match=".distcp", method="GET")
    retries = storage.STATS.retries
    state_bucket = checkpoint.load(storage.locate(remote.uri), from_bucket[0], from_bucket[1], CFG, 0, 1)
    assert s3.proxy.injected == {"reset": 2} and storage.STATS.retries - retries == 2
    s3.proxy.clear()
    assert state_bucket["step"] == state_disk["step"] == 2
    (m_disk, o_disk), (m_bucket, o_bucket) = _state(*from_disk[:2]), _state(*from_bucket[:2])
    assert m_disk.keys() == m_bucket.keys() and o_disk.keys() == o_bucket.keys() and len(o_disk) > 0
    for k in m_disk:
        assert torch.equal(m_disk[k], m_bucket[k]), k
    for k in o_disk:
        for n in o_disk[k]:
            assert torch.equal(torch.as_tensor(o_disk[k][n]), torch.as_tensor(o_bucket[k][n])), (k, n)

    torch.manual_seed(3)
    only_model = archs.build(CFG)
    state = {"model": only_model.state_dict()}
    reader = checkpoint.dcp_load(state, storage.locate(remote.uri), no_dist=True)
    shards = sum(f.stat().st_size for f in local.glob("*.distcp"))
    assert 0.25 * shards < reader.bytes_read < 0.45 * shards
    for k, v in state["model"].items():
        assert torch.equal(v, m_disk[k]), k


def _verify_share(rank, world, run_dir, out):
    """Rank `rank` of a group resuming from a run whose latest checkpoint has one flipped byte."""
    from pathlib import Path

    hashed = []
    real = checkpoint._digest
    checkpoint._digest = lambda loc: hashed.append(str(Path(str(loc.path)).relative_to(run_dir))) or real(loc)
    try:
        with pytest.warns(UserWarning, match="previous intact checkpoint checkpoint_00000002"):
            chosen = checkpoint.choose_resume(Path(run_dir) / checkpoint.dir_name(4), run_dir)
    finally:
        checkpoint._digest = real
    Path(out, f"rank{rank}.json").write_text(json.dumps({"chosen": Path(chosen).name, "hashed": hashed}))


@pytest.mark.multiproc
def test_a_resuming_group_hashes_each_file_once_between_its_ranks_and_agrees(tmp_path):
    """At 64 ranks every rank hashing the whole checkpoint would read it 64 times: each rank
    hashes every world-th file, and the rank that finds the corrupt one tells the others."""
    from tests import ranks

    model, opt, sched = fresh()
    run = tmp_path / "run"
    for step in (2, 4):
        save(run / checkpoint.dir_name(step), model, opt, sched, step)
    latest = run / checkpoint.dir_name(4)
    listed = sorted(json.loads((latest / "manifest_rank0.json").read_text()))
    # The flipped file is the one rank 1 hashes: rank 0 finds nothing wrong in its own share.
    victim = latest / listed[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    ranks.run(_verify_share, 2, str(run), str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["chosen"] for g in got] == [checkpoint.dir_name(2)] * 2
    older, newer = checkpoint.dir_name(2), checkpoint.dir_name(4)
    # The older checkpoint: each rank hashed every other file, together each file once.
    assert [sorted(h for h in g["hashed"] if h.startswith(older)) for g in got] == [
        [f"{older}/{n}" for n in listed[0::2]], [f"{older}/{n}" for n in listed[1::2]]]
    # The latest: rank 0 found its share intact; rank 1 found the flipped file in its own, and both moved on.
    assert sorted(h for h in got[0]["hashed"] if h.startswith(newer)) == [f"{newer}/{n}" for n in listed[0::2]]
    mine = {h for h in got[1]["hashed"] if h.startswith(newer)}
    assert f"{newer}/{listed[1]}" in mine and mine <= {f"{newer}/{n}" for n in listed[1::2]}


def test_a_step_saved_again_by_fewer_workers_verifies_without_the_earlier_ranks_files(tmp_path):
    """A run that fell back to an older checkpoint re-saves a step into the directory an earlier
    save of it by 3 workers used: their extra manifests and shards are left over, not missing."""
    model, opt, sched = fresh()
    path = tmp_path / checkpoint.dir_name(4)
    save(path, model, opt, sched, 4)
    for r in (1, 2):  # what ranks 1 and 2 of the earlier 3-worker save left there
        (path / f"__{r}_0.distcp").write_bytes(b"stale")
        (path / f"manifest_rank{r}.json").write_text(json.dumps({f"__{r}_0.distcp": {"bytes": 1, "sha256": "0"}}))
    assert checkpoint.verify(path)["world_size"] == 1
    assert checkpoint.latest_complete(tmp_path) == path
    (path / "manifest_rank0.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"incomplete: 0 of 1 ranks' manifests \(missing manifest_rank0.json\)"):
        checkpoint.verify(path)


def _unreadable_share(rank, world, run_dir, out):
    """Rank 1 cannot read its share (the store keeps failing); rank 0 can."""
    from pathlib import Path

    from cluster.data import storage

    real = checkpoint._digest
    if rank == 1:
        def failing(loc):
            raise storage.StorageError(f"read {loc.uri} failed after 6 attempts (timeout)")
        checkpoint._digest = failing
    try:
        checkpoint.choose_resume(Path(run_dir) / checkpoint.dir_name(2), run_dir)
        outcome = "resumed"
    except checkpoint.CheckpointError as e:
        outcome = str(e)
    finally:
        checkpoint._digest = real
    Path(out, f"rank{rank}.txt").write_text(outcome)


@pytest.mark.multiproc
def test_a_rank_that_cannot_check_its_share_stops_every_rank_without_a_hang(tmp_path):
    from tests import ranks

    model, opt, sched = fresh()
    save(tmp_path / "run" / checkpoint.dir_name(2), model, opt, sched, 2)
    ranks.run(_unreadable_share, 2, str(tmp_path / "run"), str(tmp_path))
    for r in range(2):
        assert (tmp_path / f"rank{r}.txt").read_text().startswith("rank 1 could not check"), r
