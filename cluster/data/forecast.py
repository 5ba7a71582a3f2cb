"""The forecasting task: sliding windows over a time series, MSE loss, MAE on a held-out tail.

A series [N, C] (univariate or multivariate) is cut at `tail_start = N * (1 - val_fraction)`.
Training windows have their whole target before the cut; validation windows have their target
inside the tail (their input may reach back before it: at forecast time that is the past). Each
window is (x = series[t-L:t], y = series[t:t+H]): the input never contains a value at or after
its first target. Values are standardised with the mean and std of the part before the cut only,
so nothing about the tail leaks into training; MAE is reported in the series' own units.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cluster.data.samples import write_samples

KIND = "forecast"
BUNDLED = Path(__file__).resolve().parent / "datasets"
SERIES = {"co2": ("co2.csv", "weekly CO2 at Mauna Loa (ppm), SIO via statsmodels"),
          "sunspots": ("sunspots.csv", "yearly sunspot activity, NOAA via statsmodels")}


def load_series(source: str) -> tuple[np.ndarray, list[str], str]:
    """(values float64 [N, C], channel names, description) of a bundled series or a CSV file.

    A CSV's numeric columns are the channels; a first column that is not numeric (a date) or
    only increases (a year, an index) is the time axis and skipped. Empty cells are
    interpolated linearly."""
    path, what = (BUNDLED / SERIES[source][0], SERIES[source][1]) if source in SERIES else (Path(source), source)
    if not path.is_file():
        raise FileNotFoundError(f"series source '{source}' is neither a bundled series ({', '.join(SERIES)}) "
                                "nor a CSV file")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], [r for r in rows[1:] if r]
    columns = []
    for j, name in enumerate(header):
        cells = [r[j].strip() if j < len(r) else "" for r in body]
        try:
            values = np.array([float(c) if c else np.nan for c in cells])
        except ValueError:
            continue  # a date or label column
        if j == 0 and len(values) > 1 and bool(np.all(np.diff(values) > 0)):
            continue  # a first column that only increases is the time axis (a year, an index)
        columns.append((name, values))
    if not columns:
        raise ValueError(f"series source '{source}': no numeric column in {header}")
    values = np.stack([v for _, v in columns], axis=1)
    for c in range(values.shape[1]):
        col, ok = values[:, c], ~np.isnan(values[:, c])
        if ok.sum() < 2:
            raise ValueError(f"series source '{source}': column {columns[c][0]!r} has fewer than 2 values")
        col[~ok] = np.interp(np.flatnonzero(~ok), np.flatnonzero(ok), col[ok])
    return values, [n for n, _ in columns], what


def make_windows(series: np.ndarray, context_len: int, horizon: int, val_fraction: float,
                 seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Standardised train/val windows of `series` [N, C] and the statistics to undo it."""
    n, channels = series.shape
    tail = int(round(n * (1 - val_fraction)))
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    if tail - context_len - horizon < 1 or n - tail < horizon:
        raise ValueError(f"a series of {n} steps with a held-out tail of {n - tail} cannot hold windows of "
                         f"context_len={context_len} + horizon={horizon}: shorten them or lower val_fraction")
    mean = series[:tail].mean(axis=0)
    std = series[:tail].std(axis=0) + 1e-8
    z = ((series - mean) / std).astype(np.float32)
    dtype = np.dtype([("x", np.float32, (context_len, channels)), ("y", np.float32, (horizon, channels)),
                      ("t", np.int32)])

    def windows(starts):
        out = np.empty(len(starts), dtype=dtype)
        for i, t in enumerate(starts):
            out[i] = (z[t - context_len:t], z[t:t + horizon], t)
        return out

    train = windows(range(context_len, tail - horizon + 1))  # targets end at or before the cut
    val = windows(range(max(tail, context_len), n - horizon + 1))  # targets inside the tail
    rng = np.random.default_rng(seed)
    train, val = train[rng.permutation(len(train))], val[rng.permutation(len(val))]
    info = {"mean": mean.tolist(), "std": std.tolist(), "context_len": context_len, "horizon": horizon,
            "n_channels": channels, "tail_start": tail, "length": n}
    return {"train": train, "val": val}, info


def prepare_forecast(source: str, out: str | Path, context_len: int = 64, horizon: int = 16,
                     val_fraction: float = 0.2, seed: int = 0, overwrite: bool = False):
    series, names, what = load_series(source)
    splits, info = make_windows(series, context_len, horizon, val_fraction, seed)
    info["channels"] = names
    return write_samples(out, splits, KIND, positions=context_len, source=what, info=info, seed=seed,
                         overwrite=overwrite)
