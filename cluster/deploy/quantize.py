"""Weight-only int8 / int4 quantization with torchao on CPU, saved packed, reloaded exactly.

`quantize(model, "int8" | "int4")` turns MoE layers into their inference form (one `nn.Linear`
pair per expert, moe/export.py), then torchao's `IntxWeightOnlyConfig` replaces every linear
weight (experts included, so each expert gets its own scales) by an `IntxUnpackedToInt8Tensor`:
int8 per output channel, or int4 in groups of `group_size` inputs, symmetric (no zero points).
`Int4WeightOnlyConfig` has no CPU kernel; the Intx form dequantizes inside the matmul. The router
gates stay fp32 (tiny, and they decide routing), as do the embedding (a tied head multiplies by
its transpose, which torchao's tensor does not implement) and norms.

torchao keeps int4 values one per int8 byte, so its own `state_dict` would be only ~4x smaller
than fp32. `save_quantized` writes safetensors with int4 values packed two per byte and scales in
fp16 (they are rounded to fp16 when quantizing, so the model in memory and the reloaded one are
the same numbers); `load_quantized` rebuilds the torchao tensors from those. Everything is plain
tensors: no pickle on load. bitsandbytes NF4 (`quantize_nf4`) is the GPU option, CUDA only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

FORMAT = "raymoe-weight-only-v1"
MODES = ("int8", "int4")


def _torchao():
    import logging
    import warnings

    # torchao logs its missing CUDA extensions at import; irrelevant on CPU.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao.quantization as tq
        from torchao.quantization import IntxUnpackedToInt8Tensor
    return tq, IntxUnpackedToInt8Tensor


def quantizable(module: nn.Module, fqn: str, mode: str, group_size: int) -> bool:
    """Linear weights except MoE router gates (`InferenceMoE.gate`); int4 needs in_features divisible
    by group_size (other linears stay fp32 and are listed in the summary)."""
    if not isinstance(module, nn.Linear) or fqn.endswith(".gate") or fqn.endswith("router.gate"):
        return False
    return mode == "int8" or module.in_features % group_size == 0


def quantize(model: nn.Module, mode: str, group_size: int = 32) -> dict:
    """Quantize `model` in place (after `moe.export.to_inference`); returns what was quantized."""
    if mode not in MODES:
        raise ValueError(f"--quantize: unknown mode {mode!r}; valid: {', '.join(MODES)} (nf4: quantize_nf4, GPU)")
    if mode == "int4" and group_size < 1:
        raise ValueError(f"--group-size: must be >= 1, got {group_size}")
    from moe.export import to_inference

    tq, _ = _torchao()
    to_inference(model)
    model.eval()
    chosen = [fqn for fqn, m in model.named_modules() if quantizable(m, fqn, mode, group_size)]
    skipped = [fqn for fqn, m in model.named_modules()
               if isinstance(m, nn.Linear) and fqn not in chosen and not fqn.endswith("gate")]
    granularity = tq.PerAxis(0) if mode == "int8" else tq.PerGroup(group_size)
    config = tq.IntxWeightOnlyConfig(weight_dtype=torch.int8 if mode == "int8" else torch.int4,
                                     granularity=granularity, mapping_type=tq.MappingType.SYMMETRIC)
    chosen_set = set(chosen)
    tq.quantize_(model, config, filter_fn=lambda m, fqn: fqn in chosen_set)
    for fqn in chosen:  # fp16 scales: what the file stores, so the reloaded model is this one
        w = model.get_submodule(fqn).weight
        w.scale.copy_(w.scale.to(torch.float16).to(w.scale.dtype))
    info = {"mode": mode, "group_size": group_size if mode == "int4" else None,
            "quantized": chosen, "kept_float_linears": skipped}
    model.quantization = info
    return info


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], even last dim -> uint8 with two values per byte."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_int4(p: torch.Tensor) -> torch.Tensor:
    lo, hi = (p & 0x0F).to(torch.int8) - 8, (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(plain tensors to store, metadata): packed values + fp16 scales for quantized weights."""
    _, Intx = _torchao()
    tensors, entries = {}, {}
    for name, t in model.state_dict().items():
        if isinstance(t, Intx):
            bits = int(str(t.target_dtype).replace("torch.int", ""))
            if bool((t.zero_point != 0).any()):
                raise ValueError(f"{name}: asymmetric quantization is not supported by the file format")
            q = t.qdata
            if bits == 4 and q.shape[-1] % 2 == 0:
                tensors[f"{name}.qdata"] = _pack_int4(q)
                packed = True
            else:
                tensors[f"{name}.qdata"] = q
                packed = False
            tensors[f"{name}.scale"] = t.scale.to(torch.float16)
            entries[name] = {"bits": bits, "block_size": list(t.block_size), "packed": packed,
                             "shape": list(q.shape)}
        else:
            tensors[name] = t.detach().contiguous()
    return tensors, entries


def save_quantized(model: nn.Module, path: str | Path, model_cfg: Any) -> Path:
    """One safetensors file: packed weights, fp16 scales, the model config and the quantization."""
    from safetensors.torch import save_file

    from cluster.config.typed import to_dict

    tensors, entries = quantized_state(model)
    meta = {"format": FORMAT, "model": json.dumps(to_dict(model_cfg)), "entries": json.dumps(entries),
            "quantization": json.dumps(getattr(model, "quantization", {}))}
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_quantized(path: str | Path) -> nn.Module:
    """Rebuild the quantized model of `save_quantized` (no pickle: safetensors + JSON metadata)."""
    from safetensors import safe_open

    import archs
    from cluster.config.job import model_from_dict
    from moe.export import to_inference

    _, Intx = _torchao()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a raymoe quantized model (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r}); write one with python -m jobs.export RUN --quantize int4")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model_cfg = model_from_dict(json.loads(meta["model"]))
    entries = json.loads(meta["entries"])
    model = to_inference(archs.build(model_cfg)).eval()
    for name, e in entries.items():
        q = tensors.pop(f"{name}.qdata")
        q = _unpack_int4(q) if e["packed"] else q
        scale = tensors.pop(f"{name}.scale").float()
        weight = Intx(q.contiguous(), scale, torch.zeros_like(scale, dtype=torch.int8), getattr(torch, f"int{e['bits']}"),
                      tuple(e["block_size"]), torch.float32, None)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(weight, requires_grad=False))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in entries]
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model it names: missing {missing}, unexpected {unexpected}")
    model.quantization = json.loads(meta.get("quantization", "{}"))
    return model


def save_float(model: nn.Module, path: str | Path, dtype: torch.dtype) -> Path:
    """The (inference-form) model's weights in `dtype`, as safetensors: the size baselines."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


def round_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Weights rounded to `dtype` and kept in fp32 (bf16 weights, fp32 compute: this CPU has no fast bf16)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(p.dtype))
    return model


def quantize_nf4(model: nn.Module) -> nn.Module:
    """bitsandbytes NF4 (4-bit NormalFloat, QLoRA's format) for CUDA: every non-gate linear becomes a
    `Linear4bit`. Needs `pip install bitsandbytes` and a GPU; not available on CPU."""
    if not torch.cuda.is_available():
        raise ValueError("--quantize nf4: bitsandbytes NF4 runs on CUDA GPUs only; use int4 (torchao) on CPU")
    import bitsandbytes as bnb

    from moe.export import to_inference

    to_inference(model).eval()
    for fqn, m in list(model.named_modules()):
        if quantizable(m, fqn, "int8", 1):
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False, quant_type="nf4",
                                  compute_dtype=torch.bfloat16)
            q.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, quant_type="nf4")
            parent, _, attr = fqn.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, q)
    return model.cuda()
