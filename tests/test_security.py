"""Secure defaults that can be checked in one process: pickles never run code on load, YAML
never builds objects, raymoe's servers bind to loopback, and a submitted job does not need an
open network (see also tests/test_cluster_file.py for what the cluster file exposes)."""
import pickle

import pytest

from cluster import checkpoint
from cluster.config.job import ClusterConfig, MetricsConfig, load_config
from cluster.config.typed import ConfigError
from tests.test_checkpoint import CFG, fresh, save


class _Payload:
    """Unpickling this would run `touch MARKER`: what a poisoned checkpoint file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("victim", ["train_state.pt", "rng_rank0.pt"])
def test_a_poisoned_checkpoint_pickle_is_refused_without_running_it(tmp_path, victim):
    model, opt, sched = fresh()
    ckpt = tmp_path / "checkpoint_00000001"
    save(ckpt, model, opt, sched, 1)
    marker = tmp_path / "pwned"
    with open(ckpt / victim, "wb") as f:
        pickle.dump({"step": 1, "torch": _Payload(marker)}, f)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint.load(ckpt, *fresh()[:2], CFG, rank=0, world_size=1)
    assert not marker.exists()  # weights_only=True: the payload never ran
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.verify(ckpt)  # and the manifest flags the changed file before any resume tries it


def test_a_poisoned_dcp_metadata_is_refused_without_running_it(tmp_path):
    """DCP's own reader unpickles `.metadata` with plain pickle; raymoe's allows only the classes DCP
    writes there."""
    model, opt, sched = fresh()
    ckpt = tmp_path / "checkpoint_00000001"
    save(ckpt, model, opt, sched, 1)
    state = {"model": fresh()[0].state_dict()}
    checkpoint.dcp_load(state, ckpt, no_dist=True)  # the real one loads
    marker = tmp_path / "pwned"
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(checkpoint.CheckpointError, match="io.open is not something DCP writes into .metadata"):
        checkpoint.load(ckpt, *fresh()[:2], CFG, rank=0, world_size=1)
    with pytest.raises(checkpoint.CheckpointError, match="io.open is not something DCP writes into .metadata"):
        checkpoint.load_model_weights(ckpt, fresh()[0], CFG)
    assert not marker.exists()


def test_a_dotted_global_cannot_reach_through_an_allowed_module(tmp_path):
    """Pickle resolves `module` + "a.b" attribute by attribute: an allowed DCP module must not hand
    out what it imported (its `os`)."""
    import io

    marker = tmp_path / "pwned"
    poison = (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00"  # protocol 4, a frame
              b"\x8c\x25torch.distributed.checkpoint.metadata\x94\x8c\x09os.system\x94\x93\x94"
              + b"\x8c" + bytes([len(f"touch {marker}")]) + f"touch {marker}".encode() + b"\x94\x85\x94R\x94.")
    with pytest.raises(pickle.UnpicklingError, match="torch.distributed.checkpoint.metadata.os.system is not"):
        checkpoint._MetadataUnpickler(io.BytesIO(poison)).load()
    assert not marker.exists()


def test_configs_are_parsed_without_building_objects(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError):
        load_config(str(evil))
    assert not (tmp_path / "pwned").exists()


def test_servers_bind_to_loopback_by_default():
    assert MetricsConfig().host == "127.0.0.1"
    assert ClusterConfig().address is None  # an embedded local Ray unless told otherwise
