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
