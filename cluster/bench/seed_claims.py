"""Measurements for the seed's claims that no other benchmark covers (`python -m jobs.bench claims
--measure`); `cluster/bench/claims.py` turns their JSON (and the other benchmarks') into the report.

- MoE top-2 compute per step: the `small` MoE transformer (8 experts, top-2) against a dense
  transformer of equal total parameters (the claim's comparison: d_ff = 8 x expert_hidden) and
  one of equal active FLOPs (d_ff = 2 x expert_hidden): matmul FLOPs per token (analytic, from
  `archs.ffn.active_matmul_params`) and the measured forward time of a batch.
- Gradient checkpointing: peak live activation bytes of one training step (LiveBytes) at 4-5
  depths, without checkpointing, with raymoe's per-block checkpointing, and with segments of
  about sqrt(depth) blocks (what O(sqrt n) needs); exponents fitted against depth.
- Performer: forward time and peak live bytes of the `small` performer and dense transformers at
  T = 1K..16K (batch 1, eval); exponents fitted against T.
- Mixed precision: training losses of the debug MoE model in fp32, bf16 and fp16 (loss scaling)
  on the same batches: the numerics. Speed is a GPU question; CPU bf16 speed says nothing of it.

fp32 on CPU, the machine's threads; figures carry the load average at start and end.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import archs
from archs.ffn import active_matmul_params
from cluster.bench.archs import peak_bytes

VOCAB = 256


def _median_times(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every call of each fn, the fns interleaved (round robin) so that a load change on
    a shared machine hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def _build(family: str, **kw):
    fam = archs.family(family)
    torch.manual_seed(0)
    return archs.build(fam.config_cls(**{**fam.presets["small"], "vocab_size": VOCAB, **kw}))


def _attention_flops_per_token(cfg, T: int) -> float:
    """Causal attention score + value matmuls per token, forward: 2 x 2 x d_model x (T+1)/2 per layer."""
    return cfg.n_layers * 2 * 2 * cfg.d_model * (T + 1) / 2


def measure_moe_compute(T: int, batch: int, repeats: int) -> dict:
    from moe.config import MoEConfig

    moe = _build("moe_transformer", moe=MoEConfig(**archs.family("moe_transformer").presets["small"]["moe"]))
    mcfg = moe.cfg
    k, hidden, E = mcfg.moe.top_k, mcfg.moe.expert_hidden, mcfg.moe.num_experts
    models = {"moe_top2": moe,
              "dense_equal_total_params": _build("transformer", d_ff=E * hidden),
              "dense_equal_active_flops": _build("transformer", d_ff=k * hidden)}
    tokens = torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(1))
    rows = {}
    for name, m in models.items():
        m.eval()
        rows[name] = dict(parameters=sum(p.numel() for p in m.parameters()),
                          forward_flops_per_token=2 * active_matmul_params(m) + _attention_flops_per_token(m.cfg, T))
    with torch.no_grad():
        times = _median_times({n: (lambda m=m: m(tokens)) for n, m in models.items()}, repeats)
    for name, ts in times.items():
        rows[name].update(seconds=ts, seconds_median=statistics.median(ts))
        print(f"[claims] moe compute {name:26s} {rows[name]['parameters']:>10,} params "
              f"{rows[name]['forward_flops_per_token'] / 1e6:7.2f} MFLOP/token  forward {1e3 * rows[name]['seconds_median']:7.1f} ms",
              file=sys.stderr, flush=True)
    return dict(seq_len=T, batch=batch, repeats=repeats, experts=E, top_k=k, expert_hidden=hidden,
                models=rows, backend=moe.cfg.moe.backend)


def _segment_forward(model, tokens_BT: torch.Tensor, segment: int | None) -> torch.Tensor:
    """The transformer's forward with blocks checkpointed in groups of `segment` (None: none)."""
    T = tokens_BT.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x = model.embed(tokens_BT).requires_grad_(True)  # frozen weights: backward starts from here
    blocks = list(model.layers.values())

    def run(x, group):
        for block in group:
            x = block(x, cos, sin, None, 0)
        return x

    step = segment or len(blocks)
    for i in range(0, len(blocks), step):
        group = blocks[i:i + step]
        if segment is None:
            x = run(x, group)
        else:
            x = torch.utils.checkpoint.checkpoint(run, x, group, use_reentrant=False)
    x = model.norm(x)
    return x @ model.embed.weight.t()


def measure_checkpointing(depths: list[int], T: int, batch: int, d_model: int = 128) -> dict:
    """Peak live bytes of forward + backward at each depth: activations and their gradients only.
    The weights are frozen and the gradient flows from the loss to the embedding output, so
    parameter gradients (which grow with depth whatever the mode, and appear during backward)
    do not blur the activation figure."""
    rows = []
    for L in depths:
        model = _build("transformer", n_layers=L, d_model=d_model, n_heads=4, max_seq_len=T).requires_grad_(False)
        tokens = torch.randint(0, VOCAB, (batch, T + 1), generator=torch.Generator().manual_seed(2))
        row = dict(depth=L)
        for mode, segment in (("none", None), ("per_block", 1), ("sqrt_segments", max(1, round(math.sqrt(L))))):
            def step():
                logits = _segment_forward(model, tokens[:, :-1], segment)
                F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            step()  # warm-up: lazily built state is not an activation
            row[mode] = peak_bytes(step)
            if mode == "sqrt_segments":
                row["segment"] = segment
        rows.append(row)
        print(f"[claims] checkpointing depth {L:3d}: activations none {row['none'] / 2**20:7.1f} MiB, per block "
              f"{row['per_block'] / 2**20:7.1f}, sqrt segments ({row['segment']}) {row['sqrt_segments'] / 2**20:7.1f}",
              file=sys.stderr, flush=True)
    return dict(seq_len=T, batch=batch, d_model=d_model, rows=rows,
                method="LiveBytes peak of one forward+backward, weights frozen (activations and their gradients)")


def measure_performer(lens: list[int], repeats: int, dense_lens: list[int] | None = None) -> dict:
    """Forward time (every repeat, interleaved) and peak live bytes per length; the dense model at
    `dense_lens` only (its T^2 work is what a loaded machine cannot afford at 16K)."""
    dense_lens = lens if dense_lens is None else dense_lens
    rows = []
    models = {"performer": _build("performer", max_seq_len=max(lens)), "dense": _build("transformer", max_seq_len=max(lens))}
    for m in models.values():
        m.eval()
    for i, T in enumerate(lens):
        tokens = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(3))
        here = {n: m for n, m in models.items() if n == "performer" or T in dense_lens}
        with torch.no_grad():
            times = _median_times({n: (lambda m=m: m(tokens)) for n, m in here.items()}, repeats, warmup=1 if i == 0 else 0)
            for name, m in here.items():
                rows.append(dict(model=name, seq_len=T, seconds=times[name], seconds_median=statistics.median(times[name]),
                                 peak_bytes=peak_bytes(lambda m=m: m(tokens))))
                print(f"[claims] {name:9s} T={T:6d} forward {1e3 * rows[-1]['seconds_median']:8.1f} ms, peak "
                      f"{rows[-1]['peak_bytes'] / 2**20:7.1f} MiB", file=sys.stderr, flush=True)
    return dict(batch=1, repeats=repeats, rows=rows)


def measure_mixed_precision(steps: int) -> dict:
    """The debug MoE model trained `steps` steps from one init on the same batches per precision."""
    from archs.moe_transformer import PRESETS, MoETransformerConfig
    from cluster.train.precision import DynamicLossScaler
    from cluster.train.step import train_step
    from cluster.tasks.lm import LanguageModeling
    from moe.config import MoEConfig

    class ArrayTask(LanguageModeling):  # language modelling on in-memory token arrays
        def __init__(self):
            pass

    base = dict(PRESETS["debug"])
    cfg = MoETransformerConfig(**{**base, "moe": MoEConfig(**{**base.pop("moe"), "backend": "loop"})}, vocab_size=50)
    rng = np.random.default_rng(0)
    data = []
    for _ in range(steps):
        start, stride = rng.integers(0, 50, (8, 1)), rng.integers(1, 4, (8, 1))
        data.append(((start + stride * np.arange(33)) % 50).astype(np.int64))
    out = {}
    for precision in ("fp32", "bf16", "fp16"):
        torch.manual_seed(0)
        model = archs.build(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        scaler = DynamicLossScaler(precision == "fp16")
        t0 = time.perf_counter()
        losses = [train_step(model, ArrayTask(), [b[:4], b[4:]], opt, scaler, precision, torch.device("cpu"), 1.0).loss
                  for b in data]
        out[precision] = dict(losses=losses, seconds=time.perf_counter() - t0)
        print(f"[claims] {precision}: loss {losses[0]:.4f} -> {losses[-1]:.4f} ({out[precision]['seconds']:.1f} s)",
              file=sys.stderr, flush=True)
    return dict(steps=steps, model="moe_transformer debug (d_model 32, 2 layers, 4 experts top-2)", batch="8 x 32 tokens",
                runs=out)


PARTS = ("moe_compute", "checkpointing", "performer", "mixed_precision")


def measure(quick: bool, parts: tuple[str, ...] = PARTS, previous: dict | None = None) -> dict:
    """Every measurement; `quick` (for a loaded machine, one thread) uses smaller shapes and fewer
    repeats, keeps the Performer's lengths up to 16K and stops the dense reference at 4K."""
    if quick:
        torch.set_num_threads(1)
    load0, t0 = os.getloadavg(), time.perf_counter()
    result = dict(previous or {})
    previous_meta = (previous or {}).get("meta")
    if previous_meta is not None and "parts" not in previous_meta:
        previous_meta = {**previous_meta, "parts": list(PARTS)}  # a full run
    result["meta"] = dict(quick=quick, threads=torch.get_num_threads(), torch=torch.__version__, device="cpu",
                          dtype="fp32", loadavg_start=load0, parts=list(parts), previous_meta=previous_meta)
    lens = [1024, 2048, 4096, 8192, 16384]
    runs = {
        "moe_compute": lambda: measure_moe_compute(T=128 if quick else 256, batch=2 if quick else 8,
                                                   repeats=3 if quick else 7),
        "checkpointing": lambda: measure_checkpointing([2, 4, 8, 16] if quick else [2, 4, 8, 16, 32],
                                                       T=64 if quick else 256, batch=2 if quick else 4,
                                                       d_model=64 if quick else 128),
        "performer": lambda: measure_performer(lens, repeats=1 if quick else 3,
                                               dense_lens=[1024, 2048, 4096] if quick else lens),
        "mixed_precision": lambda: measure_mixed_precision(6 if quick else 40),
    }
    for part in parts:
        result[part] = runs[part]()
    result["meta"].update(loadavg_end=os.getloadavg(), wall_s=time.perf_counter() - t0)
    return result
