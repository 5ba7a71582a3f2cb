"""Training tasks: what a batch is, how the loss is computed, which data feed it.

The loop only talks to this interface, so a new task (forecasting, image-text) is a new class
registered in `TASKS`, not a branch in the loop.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cluster.data.tokens import (
    GlobalOrder,
    ShardedBatches,
    TokenDataset,
    eval_batches,
    read_meta,
)


class Task(Protocol):
    def configure_model(self, model_cfg: Any) -> Any:
        """Fill data-dependent model fields (e.g. vocab size) and check the model fits the data."""

    def train_batches(self, global_batch: int, micro_batch_size: int, rank: int, world: int, seed: int) -> ShardedBatches: ...

    def eval_batches(self, num: int, micro_batch_size: int, rank: int, world: int) -> list[np.ndarray]: ...

    def loss_sum(self, model: nn.Module, batch: np.ndarray, device: torch.device) -> tuple[torch.Tensor, int]:
        """Summed loss over the batch's targets (fp32) and the number of targets."""

    def inputs_targets(self, batch: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's input and the loss's targets (a pipeline feeds them to different stages)."""

    def output_loss_sum(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed loss of a model output against its targets (fp32)."""

    def num_targets(self, batch: np.ndarray) -> int: ...

    def eval_metrics(self, mean_loss: float) -> dict[str, float]: ...


class LanguageModeling:
    """Next-token prediction on fixed-length token sequences [B, T+1]."""

    def __init__(self, data_path: str, prefetch: bool = False, read_timeout_s: float | None = None,
                 read_attempts: int | None = None, verify: str = "footers"):
        """`verify` (cluster.data.tokens.VERIFY): the driver checks every shard footer once; the
        workers pass "listing" and check each shard as they read it."""
        self.path = data_path
        self.meta = read_meta(data_path, verify)
        self.read = dict(prefetch=prefetch, timeout_s=read_timeout_s, attempts=read_attempts, meta=self.meta)

    @classmethod
    def from_config(cls, data_cfg, verify: str = "footers") -> LanguageModeling:
        return cls(data_cfg.path, data_cfg.prefetch, data_cfg.read_timeout_s, data_cfg.read_attempts, verify)

    def configure_model(self, model_cfg):
        if model_cfg.vocab_size is None:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=self.meta.vocab_size)
        if model_cfg.vocab_size < self.meta.vocab_size:
            raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the dataset's vocabulary "
                             f"({self.meta.vocab_size}, tokenizer {self.meta.tokenizer}); set it to null")
        if model_cfg.max_seq_len < self.meta.seq_len:
            raise ValueError(f"data at {self.path} has sequences of {self.meta.seq_len} tokens, longer than "
                             f"model.max_seq_len={model_cfg.max_seq_len}; raise model.max_seq_len or prepare "
                             f"the data with --seq-len {model_cfg.max_seq_len}")
        return model_cfg

    def train_batches(self, global_batch, micro_batch_size, rank, world, seed):
        ds = TokenDataset(self.path, "train", **self.read)
        return ShardedBatches(ds, GlobalOrder(self.meta.rows_per_shard("train"), seed),
                              global_batch, micro_batch_size, rank, world)

    def eval_batches(self, num, micro_batch_size, rank, world):
        return eval_batches(TokenDataset(self.path, "val", meta=self.meta), num, micro_batch_size, rank, world)

    def loss_sum(self, model, batch, device):
        inputs, targets = self.inputs_targets(batch, device)
        return self.output_loss_sum(model(inputs), targets), targets.numel()

    def inputs_targets(self, batch, device):
        tokens = torch.from_numpy(batch).to(device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:]

    def output_loss_sum(self, logits, targets):
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")

    def num_targets(self, batch):
        return batch.shape[0] * (batch.shape[1] - 1)

    def eval_metrics(self, mean_loss):
        return {"val_loss": mean_loss, "val_ppl": math.exp(min(mean_loss, 50.0))}
