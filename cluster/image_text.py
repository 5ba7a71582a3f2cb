"""The image-text task: paired images and captions; contrastive or captioning loss; matching
accuracy (the right caption among 10 candidates) and retrieval recall@1 on held-out pairs.

The bundled data are the 8x8 handwritten digits that scikit-learn ships, with captions MADE
FROM THEIR LABELS ("a handwritten digit seven", in one of a few phrasings): matching an image
to its caption is, plainly, recognising the digit. Any folder of images with a `captions.tsv`
(`file<TAB>caption[<TAB>label]`) works too; without labels, the candidates are other captions.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from cluster.data import GlobalOrder, ShardedBatches, micro_batches
from cluster.samples import SampleDataset, read_sample_meta, write_samples
from cluster.tokenizer import ByteTokenizer

KIND = "image_text"
BUNDLED = Path(__file__).resolve().parent / "datasets"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {w}", "the number {w}, written by hand", "a scanned {w}",
             "an image of the digit {d}"]
CANDIDATE = "a handwritten digit {w}"  # the phrasing of the 10 candidates at evaluation
NUM_CANDIDATES = 10
RETRIEVAL_GROUP = 20  # recall@1: image -> caption among this many held-out pairs at a time


def encode_caption(text: str, text_len: int) -> np.ndarray:
    """Byte tokens + eos, padded with eos to `text_len` (eos doubles as padding)."""
    tok = ByteTokenizer()
    ids = tok.encode(text) + [tok.eos_id]
    if len(ids) > text_len:
        raise ValueError(f"caption {text!r} needs {len(ids)} tokens, more than text_len={text_len}; "
                         "raise --text-len")
    return np.array(ids + [tok.eos_id] * (text_len - len(ids)), dtype=np.int32)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(BUNDLED / "digits.npz", allow_pickle=False) as f:
        return f["images"].astype(np.float32) / 16.0, f["labels"].astype(np.int64)


def load_folder(folder: str | Path, image_size: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Grey images resized to image_size, their captions, labels (-1 where none)."""
    from PIL import Image  # matplotlib's dependency

    folder = Path(folder)
    index = folder / "captions.tsv"
    if not index.is_file():
        raise FileNotFoundError(f"image folder {folder} has no captions.tsv (lines: file<TAB>caption[<TAB>label])")
    images, captions, labels = [], [], []
    for n, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise ValueError(f"{index}:{n}: expected file<TAB>caption[<TAB>label], got {line!r}")
        img = Image.open(folder / parts[0]).convert("L").resize((image_size, image_size))
        images.append(np.asarray(img, dtype=np.float32) / 255.0)
        captions.append(parts[1])
        labels.append(int(parts[2]) if len(parts) > 2 and parts[2].strip() else -1)
    return np.stack(images), captions, np.array(labels, dtype=np.int64)


def prepare_image_text(source: str = "digits", out: str | Path = "data/digits", text_len: int = 40,
                       image_size: int = 8, val_fraction: float = 0.2, seed: int = 0, overwrite: bool = False):
    rng = np.random.default_rng(seed)
    if source == "digits":
        images, labels = load_digits()
        captions = [TEMPLATES[rng.integers(len(TEMPLATES))].format(w=WORDS[y], d=y) for y in labels]
        candidates = [CANDIDATE.format(w=w) for w in WORDS]
        what = "sklearn digits (8x8), captions made from the labels"
    else:
        images, captions, labels = load_folder(source, image_size)
        candidates, what = [], f"image folder {source}"
    if images.shape[1:] != (image_size, image_size):
        raise ValueError(f"images are {images.shape[1:]}, not image_size={image_size}: pass --image-size "
                         f"{images.shape[1]}")
    dtype = np.dtype([("image", np.float32, images.shape[1:]), ("tokens", np.int32, (text_len,)),
                      ("label", np.int32)])
    rows = np.empty(len(images), dtype=dtype)
    rows["image"], rows["label"] = images, labels
    rows["tokens"] = np.stack([encode_caption(c, text_len) for c in captions])
    order = rng.permutation(len(rows))
    n_val = max(1, int(round(len(rows) * val_fraction)))
    info = {"vocab_size": ByteTokenizer.vocab_size, "pad_id": ByteTokenizer.eos_id, "text_len": text_len,
            "image_size": image_size, "candidates": candidates,
            "candidate_tokens": [encode_caption(c, text_len).tolist() for c in candidates]}
    return write_samples(out, {"train": rows[order[n_val:]], "val": rows[order[:n_val]]}, KIND,
                         positions=text_len, source=what, info=info, seed=seed, overwrite=overwrite)


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
