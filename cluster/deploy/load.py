"""A run's latest complete checkpoint, loaded on one process for generation, export or as a teacher."""
from __future__ import annotations

from pathlib import Path

import archs
from cluster import checkpoint
from cluster.config.job import model_from_dict
from cluster.data import storage
from cluster.data.tokenizer import load_tokenizer


def load_run(run_dir: str | Path, step: int | None = None, model_cfg=None, max_memory_bytes: int | None = None,
             offload_dir: str | Path | None = None, tokenizer: bool = True):
    """(model, tokenizer, checkpoint path) of a run's latest complete checkpoint (or `step`'s).

    Any parallel layout's checkpoint loads here on one process (experts are keyed by global
    index). `model_cfg`: the model the caller expects; a checkpoint of another model (another
    architecture, another shape) is refused. `max_memory_bytes` + `offload_dir`: a model larger
    than memory loads through accelerate (cluster/deploy/serving.py: blocks beyond the budget stay on disk).
    `tokenizer=False`: None in its place (a run imported without one can still be exported).
    """
    run = storage.locate(run_dir)  # a local path or a URI (s3://bucket/runs/NAME)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run.uri} does not exist")
    if step is None:
        ckpt = checkpoint.latest_complete(run)
        if ckpt is None:
            raise FileNotFoundError(f"{run.uri} has no complete checkpoint yet ({checkpoint.PREFIX}* with meta.json)")
    else:
        ckpt = storage.native(run.join(checkpoint.dir_name(step)))
    meta = checkpoint.read_meta(ckpt)
    if model_cfg is not None:
        checkpoint.check_model(meta, model_cfg, ckpt)
    model_cfg = model_from_dict(meta["model"])
    if max_memory_bytes is not None:
        from cluster.deploy.serving import load_offloaded

        if offload_dir is None:
            raise ValueError("offload_dir: needed with max_memory_bytes (where the offloaded weights go)")
        # NOTE: accelerate's offload reads local files: a checkpoint in a bucket is downloaded
        # to a temporary directory for it, and removed after.
        with storage.local_copy(ckpt) as local:
            model = load_offloaded(local, model_cfg, max_memory_bytes, offload_dir)
    else:
        model = archs.build(model_cfg)
        checkpoint.load_model_weights(ckpt, model, model_cfg)  # from a bucket: the model's byte ranges only
    tok = run.join("tokenizer")
    return model.eval(), load_tokenizer(tok.path if tok.is_local else tok.uri) if tokenizer else None, ckpt
