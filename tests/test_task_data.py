"""Sample datasets for the forecasting and image-text tasks: windows that never leak the future,
statistics from the training part only, captions made from labels, exact reads in any order."""
import numpy as np
import pytest

from cluster.data.tokens import GlobalOrder, ShardedBatches
from cluster.data.forecast import load_series, make_windows, prepare_forecast
from cluster.data.image_text import CANDIDATE, WORDS, prepare_image_text
from cluster.data.samples import SampleDataset, read_sample_meta
from cluster.data.tokenizer import ByteTokenizer


def test_bundled_series_load_and_co2_gaps_are_interpolated():
    co2, names, _ = load_series("co2")
    sun, _, _ = load_series("sunspots")
    assert co2.shape == (2284, 1) and names == ["co2_ppm"] and not np.isnan(co2).any()
    assert sun.shape == (309, 1)  # the year column is the time axis, not a channel
    assert 310 < co2.min() < co2.max() < 380


def test_csv_series_with_a_date_column_and_gaps(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("date,a,b\n2020-01-01,1,10\n2020-01-02,,20\n2020-01-03,3,30\n2020-01-04,4,\n2020-01-05,5,50\n")
    values, names, _ = load_series(str(csv))
    assert names == ["a", "b"]
    np.testing.assert_allclose(values, [[1, 10], [2, 20], [3, 30], [4, 40], [5, 50]])


@pytest.mark.parametrize("context_len,horizon", [(8, 3), (16, 1)])
def test_forecast_windows_never_see_their_future(context_len, horizon):
    rng = np.random.default_rng(0)
    series = np.cumsum(rng.normal(size=(200, 2)), axis=0)
    splits, info = make_windows(series, context_len, horizon, val_fraction=0.25)
    tail, mean, std = info["tail_start"], np.array(info["mean"]), np.array(info["std"])
    np.testing.assert_allclose(mean, series[:tail].mean(0))  # statistics of the training part only
    for split, rows in splits.items():
        for row in rows:
            t = int(row["t"])
            np.testing.assert_allclose(row["x"] * std + mean, series[t - context_len:t], atol=1e-4)
            np.testing.assert_allclose(row["y"] * std + mean, series[t:t + horizon], atol=1e-4)
            if split == "train":
                assert t + horizon <= tail  # a training target never lies in the held-out tail
            else:
                assert t >= tail  # every validation target does
    assert {int(t) for t in splits["val"]["t"]} == set(range(tail, 200 - horizon + 1))


def test_series_too_short_for_the_windows_is_a_clear_error():
    with pytest.raises(ValueError, match="context_len=64 \\+ horizon=16.*shorten"):
        make_windows(np.zeros((50, 1)), 64, 16, 0.2)


def test_sample_dataset_round_trip_and_batches_in_global_order(tmp_path):
    meta = prepare_forecast("sunspots", tmp_path / "sun", context_len=16, horizon=4)
    ds = SampleDataset(tmp_path / "sun", "train", "forecast")
    assert len(ds) == meta.num_train and ds.seq_len == 16
    everything = ds.all()
    order = GlobalOrder(meta.rows_per_shard("train"), seed=3)
    parts = [ShardedBatches(ds, order, 8, 2, rank, 2).batches_for_step(8 * 5) for rank in range(2)]
    rows = order.rows(40, 8)
    got = np.concatenate([b for part in parts for b in part])
    np.testing.assert_array_equal(got["x"], everything[rows]["x"])
    np.testing.assert_array_equal(got["t"], everything[rows]["t"])


def test_digit_captions_are_made_from_labels(tmp_path):
    meta = prepare_image_text("digits", tmp_path / "digits", text_len=40)
    val = SampleDataset(tmp_path / "digits", "val", "image_text").all()
    assert meta.num_train + meta.num_val == 1797 and abs(meta.num_val - 359) <= 1
    tok = ByteTokenizer()
    for row in val[:50]:
        caption = tok.decode(row["tokens"]).replace(",", "")
        assert WORDS[row["label"]] in caption.split() or str(row["label"]) in caption.split()
        assert 0.0 <= row["image"].min() and row["image"].max() <= 1.0
    assert meta.info["candidates"] == [CANDIDATE.format(w=w) for w in WORDS]
    assert meta.info["pad_id"] == tok.eos_id


def test_an_image_folder_with_captions(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    lines = []
    for i in range(6):
        Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png\tshade {i}\t{i % 2}")
    (folder / "captions.tsv").write_text("\n".join(lines) + "\n")
    meta = prepare_image_text(str(folder), tmp_path / "out", text_len=12, image_size=8, val_fraction=0.34)
    rows = np.concatenate([SampleDataset(tmp_path / "out", s, "image_text").all() for s in ("train", "val")])
    assert meta.num_val == 2 and rows["image"].shape == (6, 8, 8)
    assert sorted(ByteTokenizer().decode(r["tokens"]) for r in rows) == [f"shade {i}" for i in range(6)]


def test_reading_the_wrong_kind_of_data_says_how_to_make_the_right_one(tmp_path, tiny_data):
    with pytest.raises(ValueError, match="holds token .*needs forecast data.*prepare_data --task forecast"):
        read_sample_meta(tiny_data, "forecast")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        read_sample_meta(tmp_path / "nothing", "image_text")
