"""The image-text task: contrastive or captioning loss; matching accuracy (the right caption among
the candidates) and retrieval recall@1 on held-out pairs. The pairs are made by `cluster.data.image_text`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn as nn

from cluster.data.image_text import KIND, RETRIEVAL_GROUP
from cluster.data.samples import SampleDataset, read_sample_meta
from cluster.data.tokens import GlobalOrder, ShardedBatches, micro_batches


class ImageText:
    """Batches are structured arrays: image [B, S, S] in [0, 1], tokens [B, T], label [B]."""

    metric_names = ("match_acc", "recall_at_1", "moe_image_imbalance", "moe_text_imbalance")

    def __init__(self, data_path: str):
        self.path = data_path
        self.meta = read_sample_meta(data_path, KIND)
        info = self.meta.info
        self.candidates = torch.tensor(info["candidate_tokens"], dtype=torch.long) if info["candidates"] else None

    def configure_model(self, model_cfg):
        info = self.meta.info
        if not hasattr(model_cfg, "variant"):
            raise ValueError(f"model.arch={model_cfg.arch} is not an image-text model; train.task=image_text "
                             "needs model.arch: multimodal")
        # The data define the captions' length and padding; the vocabulary only if the model leaves it open.
        model_cfg = dataclasses.replace(model_cfg, text_len=info["text_len"], pad_id=info["pad_id"],
                                        vocab_size=model_cfg.vocab_size or info["vocab_size"])
        if model_cfg.image_size != info["image_size"]:
            raise ValueError(f"model.image_size={model_cfg.image_size} but the images at {self.path} are "
                             f"{info['image_size']}x{info['image_size']}; set model.image_size: {info['image_size']}")
        if model_cfg.vocab_size < info["vocab_size"]:
            raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the data's "
                             f"{info['vocab_size']}; set it to null")
        return model_cfg

    def train_batches(self, global_batch, micro_batch_size, rank, world, seed):
        ds = SampleDataset(self.path, "train", KIND)
        return ShardedBatches(ds, GlobalOrder(self.meta.rows_per_shard("train"), seed), global_batch,
                              micro_batch_size, rank, world)

    def eval_batches(self, num, micro_batch_size, rank, world):
        """This rank's share of the first `num` held-out pairs, in groups of RETRIEVAL_GROUP."""
        ds = SampleDataset(self.path, "val", KIND)
        total = min(num, len(ds))
        groups = micro_batches(0, total, RETRIEVAL_GROUP)
        return [ds.get(np.arange(s, s + c)) for s, c in groups[rank::world]]

    def _tensors(self, batch, device):
        return (torch.from_numpy(np.ascontiguousarray(batch["image"])).to(device),
                torch.from_numpy(batch["tokens"].astype(np.int64)).to(device))

    def loss_sum(self, model: nn.Module, batch, device):
        images, tokens = self._tensors(batch, device)
        return model(images, tokens)  # the model's forward is its objective: (summed loss, count)

    def inputs_targets(self, batch, device):
        raise ValueError("train.task=image_text does not run under pipeline parallelism; set parallel.pp: 1")

    def num_targets(self, batch):
        return len(batch)

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch, device):
        """(loss sum, count, metric sums): matching accuracy among 10 candidate captions, and
        image -> caption recall@1 within the group (a retrieved caption counts as right if it
        describes the same label)."""
        images, tokens = self._tensors(batch, device)
        loss, n = model(images, tokens)
        model = getattr(model, "module", model)
        labels = torch.from_numpy(batch["label"].astype(np.int64)).to(device)
        out = {}
        if self.candidates is not None and (labels >= 0).all():
            scores = model.match_scores(images, self.candidates.to(device))  # [B, 10]
            out["match_acc"] = (float((scores.argmax(-1) == labels).sum()), len(batch))
        scores = model.match_scores(images, tokens)  # [B, B]
        best = scores.argmax(-1)
        same = (labels[best] == labels) if (labels >= 0).all() else (tokens[best] == tokens).all(-1)
        out["recall_at_1"] = (float(same.sum()), len(batch))
        counts = getattr(model, "modality_expert_counts", None)
        if counts is not None:
            for modality, c in counts().items():  # [layers, E] since the last reset
                if c.sum() > 0:
                    load = c.float().sum(0)
                    out[f"moe_{modality}_imbalance"] = (float(load.max() / load.mean()) * len(batch), len(batch))
            model.reset_modality_counts()
        return loss, n, out

    def eval_metrics(self, mean_loss):
        return {"val_loss": mean_loss}
