"""The forecasting task: MSE on standardised windows, MAE on the held-out tail in the series' units.

The windows themselves (leak-free split, train-only statistics) are made by `cluster.data.forecast`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn as nn

from cluster.data.forecast import KIND
from cluster.data.samples import SampleDataset, read_sample_meta
from cluster.data.tokens import GlobalOrder, ShardedBatches, eval_batches


class Forecasting:
    """Batches are structured arrays with fields x [B, L, C], y [B, H, C] (standardised)."""

    metric_names = ("val_mae",)

    def __init__(self, data_path: str):
        self.path = data_path
        self.meta = read_sample_meta(data_path, KIND)
        info = self.meta.info
        self.std = torch.tensor(info["std"], dtype=torch.float32)

    def configure_model(self, model_cfg):
        info = self.meta.info
        if getattr(model_cfg, "n_channels", "missing") == "missing":
            raise ValueError(f"model.arch={model_cfg.arch} is not a forecaster; train.task=forecast needs "
                             "model.arch: rnn_transformer or ts_transformer")
        if model_cfg.n_channels is None:
            model_cfg = dataclasses.replace(model_cfg, n_channels=info["n_channels"])
        for name in ("n_channels", "context_len", "horizon"):
            if getattr(model_cfg, name) != info[name]:
                raise ValueError(f"model.{name}={getattr(model_cfg, name)} but the data at {self.path} has "
                                 f"{name}={info[name]}; set model.{name}: {info[name]} or prepare the data with "
                                 f"--{name.replace('_', '-')} {getattr(model_cfg, name)}")
        return model_cfg

    def train_batches(self, global_batch, micro_batch_size, rank, world, seed):
        ds = SampleDataset(self.path, "train", KIND)
        return ShardedBatches(ds, GlobalOrder(self.meta.rows_per_shard("train"), seed), global_batch,
                              micro_batch_size, rank, world)

    def eval_batches(self, num, micro_batch_size, rank, world):
        return eval_batches(SampleDataset(self.path, "val", KIND), num, micro_batch_size, rank, world)

    def inputs_targets(self, batch, device):
        return (torch.from_numpy(np.ascontiguousarray(batch["x"])).to(device),
                torch.from_numpy(np.ascontiguousarray(batch["y"])).to(device))

    def output_loss_sum(self, pred, targets):
        return ((pred.float() - targets) ** 2).sum()

    def loss_sum(self, model: nn.Module, batch, device):
        x, y = self.inputs_targets(batch, device)
        return self.output_loss_sum(model(x), y), y.numel()

    def num_targets(self, batch):
        return int(np.prod(batch["y"].shape))

    def eval_sums(self, model: nn.Module, batch, device):
        """(MSE sum, count, {"val_mae": (sum, count)}) from one forward; MAE in the series' units."""
        x, y = self.inputs_targets(batch, device)
        pred = model(x).float()
        err = (pred - y).abs() * self.std.to(device)
        return self.output_loss_sum(pred, y), y.numel(), {"val_mae": (float(err.sum()), y.numel())}

    def eval_metrics(self, mean_loss):
        return {"val_loss": mean_loss}
