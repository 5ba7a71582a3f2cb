"""The image-text task: paired images and captions; contrastive or captioning loss; matching
accuracy (the right caption among 10 candidates) and retrieval recall@1 on held-out pairs.

The bundled data are the 8x8 handwritten digits that scikit-learn ships, with captions MADE
FROM THEIR LABELS ("a handwritten digit seven", in one of a few phrasings): matching an image
to its caption is, plainly, recognising the digit. Any folder of images with a `captions.tsv`
(`file<TAB>caption[<TAB>label]`) works too; without labels, the candidates are other captions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cluster.data.samples import write_samples
from cluster.data.tokenizer import ByteTokenizer

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
