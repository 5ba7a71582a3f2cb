"""From a checkpoint to something that serves: big-model loading, ONNX export, measurements.

- `load_offloaded`: a model larger than memory, on one process, through accelerate's big-model
  utilities: built with empty (meta) weights, the DCP checkpoint streamed tensor by tensor into
  safetensors shards, then dispatched with a `max_memory` budget: blocks that do not fit stay on
  disk (memory-mapped) and are loaded for their own forward only.
- `export_onnx` / `ort_session`: the forward pass (tokens [batch, seq] -> logits) as ONNX with
  dynamic batch and sequence length, via torch's dynamo exporter; MoE layers run their dense
  dropless form (moe/export.py) so routing traces into TopK / GatherElements / ScatterElements.
- `eval_loss`, `latency`, `generation_throughput`: the figures every export reports.

Every language-model family exports. Performer's causal linear attention and Mamba's scan loop in
Python over chunks of the sequence (a trace would fix the number of chunks, i.e. the length), so
the export runs inside the model's `export_form()`: the whole sequence as one chunk, a [T, T]
masked product built from tensor ops on the input's shape. That form costs O(T^2) memory per head
at inference (the chunked training form: O(T * chunk)); parity is checked against the chunked
form. `check_exportable` refuses the other families (no token -> logits forward).
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cluster import checkpoint

ONNX_FAMILIES = ("transformer", "moe_transformer", "hourglass", "sparse_transformer", "performer", "mamba")


def check_exportable(model_cfg: Any) -> None:
    """Raise ValueError unless the family's forward traces into one graph for every length."""
    arch = model_cfg.arch
    if arch in ONNX_FAMILIES:
        moe = getattr(model_cfg, "moe", None)
        if moe is not None and moe.router != "topk":
            raise ValueError(f"model.moe.router: {moe.router!r} routing is training-only; cannot export")
        return
    raise ValueError(f"model.arch: {arch!r} cannot be exported to ONNX: it is not a language model family "
                     f"with a tokens -> logits forward. Exportable families: {', '.join(ONNX_FAMILIES)}; use "
                     "--quantize for a smaller torch model instead")


class LogitsOnly(nn.Module):
    """tokens [B, T] -> logits [B, T, V]: the plain forward, without cache arguments."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)


def inference_copy(model: nn.Module, dense: bool) -> nn.Module:
    """A copy of `model` in evaluation mode with its MoE layers in inference form."""
    from moe.export import to_inference

    return to_inference(copy.deepcopy(model), dense=dense).eval()


def export_form(model: nn.Module):
    """The model's export-only formulation (`export_form()`: Performer, Mamba), else a no-op context."""
    import contextlib

    form = getattr(model, "export_form", None)
    return form() if form is not None else contextlib.nullcontext(model)


def export_onnx(model: nn.Module, path: str | Path, example_len: int = 16) -> Path:
    """Write `model`'s forward as ONNX (opset of the dynamo exporter), batch and sequence dynamic;
    families with a chunked loop are traced in their one-chunk `export_form` (O(T^2) memory)."""
    import warnings

    check_exportable(model.cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inference = inference_copy(model, dense=True)
    wrapped = LogitsOnly(inference)
    example = torch.zeros(2, min(example_len, model.cfg.max_seq_len), dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=model.cfg.max_seq_len)
    with warnings.catch_warnings(), torch.no_grad(), export_form(inference):
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (example,), str(path), dynamo=True, input_names=["tokens"],
                          output_names=["logits"], dynamic_shapes={"tokens": {0: batch, 1: seq}},
                          external_data=False, verbose=False)
    return path


def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_logits(session, tokens: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(["logits"], {"tokens": tokens.numpy().astype(np.int64)})[0])


@torch.no_grad()
def onnx_parity(session, model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Largest |ONNX Runtime - torch| over the logits of `batches` (torch in its training form)."""
    model.eval()
    return max(float((ort_logits(session, b) - model(b)).abs().max()) for b in batches)


def _median_s(fn, repeats: int, warmup: int = 1) -> float:
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def latency(model: nn.Module | None, session, seq_lens: list[int], batch: int = 1, repeats: int = 5) -> list[dict]:
    """Median forward time of torch (eager, fp32) and ONNX Runtime at each sequence length."""
    rows = []
    for T in seq_lens:
        tokens = torch.randint(0, 2, (batch, T))
        row: dict = {"seq_len": T, "batch": batch}
        if model is not None:
            model.eval()
            row["torch_ms"] = 1e3 * _median_s(lambda: model(tokens), repeats)
        if session is not None:
            row["ort_ms"] = 1e3 * _median_s(lambda: ort_logits(session, tokens), repeats)
        rows.append(row)
    return rows


@torch.no_grad()
def eval_loss(model: nn.Module, batches: list[np.ndarray]) -> float:
    """Mean next-token cross-entropy (nats) over validation rows [B, T+1]."""
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        tokens = torch.from_numpy(np.asarray(batch)).long()
        logits = model(tokens[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"))
        count += tokens[:, 1:].numel()
    return total / max(count, 1)


@torch.no_grad()
def generation_throughput(model: nn.Module, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
    """Tokens/s of greedy cached generation of `new_tokens` tokens for `batch` prompts."""
    from archs.sampling import generate

    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 100, (batch, prompt_len), generator=gen)
    generate(model, prompt, min(new_tokens, 4), temperature=0)  # warm-up (first-call allocations)
    t0 = time.perf_counter()
    out = generate(model, prompt, new_tokens, temperature=0)
    dt = time.perf_counter() - t0
    made = (out.shape[1] - prompt_len) * batch
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "seconds": dt, "tokens_per_s": made / dt}


def validation_batches(run_dir: str | Path, sequences: int, micro_batch: int = 8) -> list[np.ndarray]:
    """The first `sequences` validation rows of the dataset the run trained on (its config.yaml)."""
    import yaml

    from cluster.data.tokens import TokenDataset, eval_batches

    from cluster.data import storage

    cfg_file = storage.locate(run_dir).join("config.yaml")  # a local path or a URI
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file.uri} is missing: cannot tell which dataset the run used (pass --data)")
    data_path = yaml.safe_load(cfg_file.read_text())["data"]["path"]
    return eval_batches(TokenDataset(data_path, "val"), sequences, micro_batch, 0, 1)


# ----------------------------------------------------------------------------------------------
# Big-model loading: empty weights, checkpoint streamed to safetensors, dispatch with disk offload
# ----------------------------------------------------------------------------------------------


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def stream_to_safetensors(ckpt: str | Path, model: nn.Module, out_dir: str | Path, shard_bytes: int = 64 << 20) -> Path:
    """Copy a DCP checkpoint's model weights into safetensors shards + an index, holding at most
    one shard (and one parameter, experts stacked) in memory. `model` may be on the meta device.
    Returns the index file (accelerate's `load_checkpoint_in_model` reads it)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = checkpoint.expert_layout(model)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size, n = {}, 0, n + 1

    for name, t in model.state_dict().items():
        keys = [f"{name}.expert{j}" for j in range(layout[name][1])] if name in layout else [name]
        shape = t.shape[1:] if name in layout else t.shape
        part = {k: torch.empty(shape, dtype=t.dtype) for k in keys}
        checkpoint.dcp_load({"model": part}, Path(ckpt), no_dist=True)
        value = torch.stack([part[k] for k in keys]) if name in layout else part[name]
        if size and size + value.numel() * value.element_size() > shard_bytes:
            flush()
        shard[name] = value.contiguous()
        size += value.numel() * value.element_size()
    flush()
    index = out_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"source": str(ckpt)}, "weight_map": weight_map}, indent=1))
    return index


def block_device_map(model: nn.Module, max_memory_bytes: int) -> dict[str, str]:
    """Everything outside `layers` (embedding, final norm, head: used by the model's own forward)
    in memory; then whole blocks in order while they fit the budget; the rest on disk."""
    device_map: dict[str, str] = {}
    used = 0
    for name, child in model.named_children():
        if name != "layers":
            device_map[name] = "cpu"
            used += sum(t.numel() * t.element_size() for t in child.state_dict().values())
    for i, block in model.layers.items():
        size = sum(t.numel() * t.element_size() for t in block.state_dict().values())
        fits = used + size <= max_memory_bytes
        device_map[f"layers.{i}"] = "cpu" if fits else "disk"
        used += size if fits else 0
    return device_map


def load_offloaded(ckpt: str | Path, model_cfg: Any, max_memory_bytes: int, offload_dir: str | Path) -> nn.Module:
    """The checkpoint's model with at most `max_memory_bytes` of weights resident; the rest of the
    blocks are memory-mapped from `offload_dir` and loaded for their forward only."""
    from accelerate import dispatch_model, init_empty_weights, load_checkpoint_in_model

    import archs

    checkpoint.check_model(checkpoint.read_meta(ckpt), model_cfg, ckpt)
    with init_empty_weights(include_buffers=False):
        model = archs.build(model_cfg)
    offload_dir = Path(offload_dir)
    index = stream_to_safetensors(ckpt, model, offload_dir / "weights")
    device_map = block_device_map(model, max_memory_bytes)
    load_checkpoint_in_model(model, str(index), device_map=device_map, offload_folder=str(offload_dir / "offload"),
                             offload_state_dict=False)
    # A block loads all its weights when its forward starts: submodules are not always called
    # through their forward (the MoE router multiplies by gate.weight with F.linear).
    blocks = sorted({type(b).__name__ for b in model.layers.values()})
    model = dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir / "offload"),
                           preload_module_classes=blocks)
    model.device_map = device_map
    return model.eval()


def resident_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers actually held in memory (not meta / offloaded)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
               if t.device.type != "meta")


def write_summary(out_dir: str | Path, summary: dict, name: str = "summary.json") -> Path:
    path = Path(out_dir) / name
    path.write_text(json.dumps(summary, indent=1, default=str))
    return path
