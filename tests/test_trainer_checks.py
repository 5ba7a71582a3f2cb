"""The driver rejects bad data and bad model/data combinations before Ray or any worker starts."""
import pytest

import cluster.train.driver
from cluster.train.driver import fit
from tests.test_ray_train import debug_job


@pytest.fixture(autouse=True)
def no_ray_started(monkeypatch):
    def connect(address):
        raise AssertionError("the error must come before connecting to Ray")
    monkeypatch.setattr(cluster.train.driver, "connect", connect)


def test_missing_data_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; run `python -m jobs.prepare_data"):
        fit(debug_job(tmp_path / "nothing", tmp_path, "x"))


def test_empty_data_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty: not a dataset"):
        fit(debug_job(tmp_path / "empty", tmp_path, "x"))


def test_data_sequences_longer_than_the_model(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="sequences of 64 tokens, longer than model.max_seq_len=32"):
        fit(debug_job(tiny_data, tmp_path, "x", "model.max_seq_len=32"))


def test_model_vocabulary_smaller_than_the_data(tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r"model.vocab_size=100 is smaller than the dataset's vocabulary \(257"):
        fit(debug_job(tiny_data, tmp_path, "x", "model.vocab_size=100"))
