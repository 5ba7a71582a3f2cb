"""The sequence-model families side by side at about equal parameter counts (fp32; never a test).

  python -m jobs.bench archs --out archs.json     # full sweep: T = 512, 2048, 8192 (+16384 forward)
  python -m jobs.bench archs --quick              # smaller sweep (T = 128, 512), a minute or two

Models: the dense transformer, the same with a local attention window, the hourglass, sparse
attention (blockwise, local_global, learned), the Performer and Mamba, each from its `small`
preset (vocabulary 256) with `max_seq_len` raised to the longest length asked for. The hourglass
uses mean pooling and repeat upsampling, so that its parameter count equals the dense one.

Per model and sequence length T:
- train: one optimizer step (forward, backward, AdamW) on `--tokens-per-step` tokens in
  tokens_per_step / T sequences (the same work in matmuls at every T: what changes with T is
  the sequence mixing). The fastest of `--repeats` steps after one warm-up step (on a shared
  machine other processes only add time; the median is recorded too).
- forward: one sequence of T tokens, eval mode, no autograd; the fastest of `--repeats`.
- peak memory of both: the largest total of live tensor bytes allocated while the step (or the
  forward) runs, counted by `LiveBytes` (a TorchDispatchMode that sees every aten op's outputs,
  backward and optimizer included, and their frees through weak references). It excludes what
  existed before the step (weights, optimizer state: about 16 bytes per parameter, the same for
  all models) and scratch memory that a single kernel allocates and frees inside itself (e.g.
  fused attention's per-thread tiles). It is measured in one extra step, apart from the timed ones.
A training length is skipped, and recorded as skipped, when its time predicted from the previous
length (scaled by the model's `flops_per_token`) would exceed `--case-budget-s`.

Generation: a prompt of `--gen-context` tokens is prefilled into the model's cache, then
`--gen-tokens` tokens are decoded greedily one at a time; the median per-token latency and the
cache's size are reported. Mamba's scans: the chunked scan (training path) against the
sequential recurrence (`archs.mamba.scan_functions`), forward and forward+backward.

Decode cache size at `--cache-lens` context lengths: bytes per position of an allocated cache x T (MLA keeps
kv_lora_rank + qk_rope_head_dim numbers per token and layer; GQA 2 x n_kv_heads x head_dim).
`dense_gqa` (the transformer with n_heads / 2 key/value heads) and `mla` (DeepSeek-V3's attention
with dense FFNs, SwiGLU width solved for an equal parameter count) are the MLA comparison.

Timings are wall clock on a shared machine: the load average before and after is recorded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import archs
from cluster.train import malloc

VOCAB = 256
# models whose decode cache grows with the context (the size table compares MLA's latent with GQA's keys/values)
CACHE_MODELS = ("dense", "dense_gqa", "mla", "local")
MIB = 2**20

# name -> (family, overrides of its preset); `window` is filled in from --window.
MODELS: dict[str, tuple[str, dict]] = {
    "dense": ("transformer", {}),
    "local": ("transformer", {"attn_window": None}),
    "hourglass": ("hourglass", {"pool": "mean", "upsample": "repeat"}),
    "sparse_blockwise": ("sparse_transformer", {"pattern": "blockwise"}),
    "sparse_local_global": ("sparse_transformer", {"pattern": "local_global"}),
    "sparse_learned": ("sparse_transformer", {"pattern": "learned"}),
    "performer": ("performer", {}),
    "mamba": ("mamba", {}),
    # multi-head latent attention (DeepSeek-V3's, dense FFNs) against grouped-query attention at equal
    # parameters: `mla`'s shape comes from the preset's width (see mla_overrides), its SwiGLU width
    # is solved so that its parameter count matches `dense_gqa`'s
    "dense_gqa": ("transformer", {"n_kv_heads": "half"}),
    "mla": ("deepseek_v3", {}),
}


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Live bytes of the tensors allocated under this mode, and their peak.

    Each aten op's outputs are counted once per storage (outputs sharing a storage with an input,
    i.e. views, in-place and out= results, are not new memory) and uncounted when the storage is
    freed (a weak reference to torch's preserved Python storage object).
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._held: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._held:
                continue
            n = storage.nbytes()
            self._held[key] = (weakref.ref(storage, lambda _ref, key=key: self._free(key)), n)
            self.live += n
            self.peak = max(self.peak, self.live)
        return out

    def _free(self, key: int) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self.live -= held[1]


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(fastest, median) seconds of `repeats` calls after `warmup` calls. The fastest is the figure
    reported: on a shared machine other processes only ever add time."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def peak_bytes(fn: Callable[[], object]) -> int:
    with LiveBytes() as rec:
        fn()
    return rec.peak


def tensor_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from a cache object (attributes, lists, dataclasses)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage()._cdata
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x, seen) for x in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(x, seen) for x in vars(obj).values())
    return 0


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


def build_model(name: str, preset: str, max_len: int, window: int) -> torch.nn.Module:
    family, overrides = MODELS[name]
    if name == "mla":
        return build_mla(preset, max_len)
    fam = archs.family(family)
    kw = {**fam.presets[preset], **overrides, "vocab_size": VOCAB, "max_seq_len": max_len}
    if "attn_window" in overrides:
        kw["attn_window"] = window
    if overrides.get("n_kv_heads") == "half":
        kw["n_kv_heads"] = max(1, kw["n_heads"] // 2)
    torch.manual_seed(0)
    return archs.build(fam.config_cls(**kw))


def mla_overrides(preset: str) -> dict:
    """MLA at the transformer preset's width and heads: head dim D = d_model / n_heads split into
    3D/4 no-RoPE + D/4 RoPE for q/k, values of D, a KV latent of d_model / 4, no query bottleneck,
    dense FFNs, tied head (as the transformer's)."""
    t = archs.family("transformer").presets[preset]
    D = t["d_model"] // t["n_heads"]
    return dict(d_model=t["d_model"], n_layers=t["n_layers"], n_heads=t["n_heads"], q_lora_rank=None,
                kv_lora_rank=t["d_model"] // 4, qk_nope_head_dim=3 * D // 4, qk_rope_head_dim=D // 4, v_head_dim=D,
                moe=None, first_k_dense=t["n_layers"], tie_embeddings=True)


def build_mla(preset: str, max_len: int) -> torch.nn.Module:
    """The `mla` model, its SwiGLU width solved for the parameter count of `dense_gqa`."""
    fam = archs.family("deepseek_v3")
    target = sum(p.numel() for p in build_model("dense_gqa", preset, max_len, 1).parameters())
    kw = {**mla_overrides(preset), "vocab_size": VOCAB, "max_seq_len": max_len}
    probe = archs.build(fam.config_cls(**kw))
    per_unit = 3 * kw["d_model"] * kw["n_layers"]  # one more SwiGLU hidden unit in every layer
    d_ff = probe.cfg.hidden + round((target - sum(p.numel() for p in probe.parameters())) / per_unit)
    torch.manual_seed(0)
    return archs.build(fam.config_cls(**{**kw, "d_ff": d_ff}))


def cache_sizes(model, lengths: list[int]) -> list[dict]:
    """Decode-cache bytes of one sequence at each length: the bytes per position of a cache
    allocated for 64 positions, times the length (these caches are preallocated per position, so
    linear in it; allocating 128K positions would take GiBs for nothing)."""
    per_position = tensor_bytes(model.new_cache(1, 64)) / 64
    return [dict(context=L, cache_bytes=int(per_position * L), bytes_per_token=per_position) for L in lengths]


def train_step_fn(model, opt, tokens_BT1: torch.Tensor) -> Callable[[], None]:
    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(tokens_BT1[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens_BT1[:, 1:].flatten()).backward()
        opt.step()
    return step


def bench_train(model, T: int, tokens_per_step: int, repeats: int) -> dict:
    batch = max(1, tokens_per_step // T)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (batch, T + 1), generator=gen)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = train_step_fn(model, opt, tokens)
    sec, med = timed(step, repeats)
    peak = peak_bytes(step)
    del opt
    return dict(kind="train", seq_len=T, batch=batch, seconds=sec, seconds_median=med, tokens_per_s=batch * T / sec,
                peak_bytes=peak)


@torch.no_grad()
def bench_forward(model, T: int, repeats: int) -> dict:
    tokens = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(2))
    model.eval()
    sec, med = timed(lambda: model(tokens), repeats)
    peak = peak_bytes(lambda: model(tokens))
    return dict(kind="forward", seq_len=T, batch=1, seconds=sec, seconds_median=med, tokens_per_s=T / sec,
                peak_bytes=peak)


@torch.no_grad()
def bench_generation(model, context: int, new_tokens: int) -> dict:
    """Prefill `context` tokens into a fresh cache, then decode `new_tokens` greedily, timing each."""
    model.eval()
    prompt = torch.randint(0, VOCAB, (1, context), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(1, context + new_tokens)
    t0 = time.perf_counter()
    logits = model(prompt, cache=cache, pos=0)[:, -1]
    prefill = time.perf_counter() - t0
    per_token = []
    for i in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        logits = model(nxt, cache=cache, pos=context + i)[:, -1]
        per_token.append(time.perf_counter() - t0)
    return dict(context=context, new_tokens=new_tokens, prefill_s=prefill,
                ms_per_token=1e3 * statistics.median(per_token[1:] or per_token),
                cache_bytes=tensor_bytes(cache))


def bench_scans(lengths: list[int], preset: str, repeats: int) -> list[dict]:
    """Mamba's chunked scan vs the sequential recurrence at the preset's scan shape, batch 1."""
    from archs.mamba import scan_functions

    cfg = archs.family("mamba").config_cls(**{**archs.family("mamba").presets[preset], "vocab_size": VOCAB})
    H, P, N, chunk = cfg.n_heads, cfg.head_dim, cfg.d_state, cfg.chunk_size
    fns = {k: v for k, v in scan_functions().items() if k in ("chunked", "sequential")}
    rows = []
    for T in lengths:
        g = torch.Generator().manual_seed(4)
        x = torch.randn(1, T, H, P, generator=g)
        dt = F.softplus(torch.randn(1, T, H, generator=g) - 3)
        A = -torch.rand(H, generator=g) * 4 - 0.5
        B, C = torch.randn(1, T, N, generator=g), torch.randn(1, T, N, generator=g)
        calls = {"chunked": lambda *a: fns["chunked"](*a, chunk=chunk), "sequential": fns["sequential"]}
        outs = {}
        for impl, fn in calls.items():
            leaves = [t.clone().requires_grad_() for t in (x, dt, B, C)]

            def fwd_bwd():
                y, _ = fn(leaves[0], leaves[1], A, leaves[2], leaves[3])
                y.square().sum().backward()

            with torch.no_grad():
                fwd_s = timed(lambda: fn(x, dt, A, B, C), repeats)[0]
                outs[impl] = fn(x, dt, A, B, C)[0]
            rows.append(dict(impl=impl, seq_len=T, heads=H, head_dim=P, d_state=N, chunk=chunk,
                             forward_s=fwd_s, fwd_bwd_s=timed(fwd_bwd, repeats)[0]))
        diff = (outs["chunked"] - outs["sequential"]).abs().max().item()
        for r in rows[-2:]:
            r["max_abs_diff"] = diff
            r["speedup_vs_sequential"] = None
        seq, ch = rows[-1], rows[-2]
        ch["speedup_vs_sequential"] = {"forward": seq["forward_s"] / ch["forward_s"],
                                       "fwd_bwd": seq["fwd_bwd_s"] / ch["fwd_bwd_s"]}
        print(f"[archs] scan T={T}: chunked {ch['forward_s'] * 1e3:.1f} ms, sequential {seq['forward_s'] * 1e3:.1f} ms "
              f"(forward); max |diff| {diff:.1e}", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------


def run(args) -> dict:
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    max_len = max([*args.seq_lens, *args.forward_only_lens, args.gen_context + args.gen_tokens])
    models, results, generation, caches = [], [], [], []
    for name in args.models:
        model = build_model(name, args.preset, max_len, args.window)
        family, overrides = MODELS[name]
        config = {k: v for k, v in dataclasses.asdict(model.cfg).items() if not k.startswith("_")}
        params = sum(p.numel() for p in model.parameters())
        models.append(dict(name=name, family=family, params=params, config=config))
        prev = None  # (T, seconds) of the last training length that ran
        for T in args.seq_lens:
            t0 = time.perf_counter()
            if prev is not None:
                predicted = prev[1] * model.flops_per_token(T) / model.flops_per_token(prev[0])
                predicted_total = predicted * (args.repeats + 2)  # warm-up, timed steps, the memory step
                if predicted_total > args.case_budget_s:
                    reason = (f"predicted {predicted:.1f} s/step x {args.repeats + 2} steps > --case-budget-s "
                              f"{args.case_budget_s:g}")
                    results.append(dict(model=name, kind="train", seq_len=T, skipped=reason, predicted_s=predicted))
                    print(f"[archs] {name:20s} T={T:6d} train skipped: {reason}", file=sys.stderr, flush=True)
                    continue
            r = bench_train(model, T, args.tokens_per_step, args.repeats)
            prev = (T, r["seconds"])
            results.append(dict(model=name, skipped=None, **r))
            print(f"[archs] {name:20s} T={T:6d} train {r['tokens_per_s']:8.0f} tok/s  peak {r['peak_bytes'] / MIB:8.1f} MiB"
                  f"  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        for T in [*args.seq_lens, *args.forward_only_lens]:
            t0 = time.perf_counter()
            r = bench_forward(model, T, args.repeats)
            results.append(dict(model=name, skipped=None, **r))
            print(f"[archs] {name:20s} T={T:6d} forward {r['seconds'] * 1e3:8.1f} ms  peak {r['peak_bytes'] / MIB:8.1f} MiB"
                  f"  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        if args.cache_lens and name in CACHE_MODELS:
            caches.append(dict(model=name, sizes=cache_sizes(model, args.cache_lens)))
        if args.gen_tokens:
            t0 = time.perf_counter()
            g = dict(model=name, **bench_generation(model, args.gen_context, args.gen_tokens))
            generation.append(g)
            print(f"[archs] {name:20s} generation at {g['context']}: {g['ms_per_token']:.2f} ms/token, cache "
                  f"{g['cache_bytes'] / MIB:.1f} MiB  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        del model
    scans = bench_scans(args.scan_lens, args.preset, args.repeats) if args.scan_lens else []
    meta = dict(threads=torch.get_num_threads(), torch=torch.__version__, dtype="fp32", device="cpu",
                preset=args.preset, vocab_size=VOCAB, seq_lens=args.seq_lens, forward_only_lens=args.forward_only_lens,
                tokens_per_step=args.tokens_per_step, repeats=args.repeats, window=args.window,
                gen_context=args.gen_context, gen_tokens=args.gen_tokens, scan_lens=args.scan_lens,
                cache_lens=args.cache_lens,
                case_budget_s=args.case_budget_s, quick=args.quick, caching_malloc=malloc.active(), loadavg_start=load0, loadavg_end=os.getloadavg(),
                memory_method="LiveBytes: peak of live tensor bytes allocated during the measured call (TorchDispatchMode "
                              "over aten op outputs, freed via weak refs); excludes weights/optimizer state held before "
                              "it and scratch allocated inside single kernels",
                wall_s=time.perf_counter() - t_start)
    out = dict(meta=meta, models=models, results=results, generation=generation, scan=scans, cache_sizes=caches)
    out["claims"] = claims(out)
    return out


def _find(out: dict, model: str, kind: str, T: int) -> dict | None:
    for r in out["results"]:
        if r["model"] == model and r["kind"] == kind and r["seq_len"] == T and not r.get("skipped"):
            return r
    return None


def claims(out: dict) -> dict:
    """The seed's three claims, set against the measured ratios (None where a figure is missing)."""
    lens = sorted({r["seq_len"] for r in out["results"] if not r.get("skipped")})
    names = {m["name"] for m in out["models"]}

    def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
        return a[key] / b[key] if a and b and b[key] else None

    result = {}
    if {"dense", "local"} <= names:
        T = max((t for t in lens if _find(out, "dense", "train", t) and _find(out, "local", "train", t)), default=None)
        result["local_window_3x_faster"] = dict(
            seq_len=T, train_speedup=ratio(_find(out, "local", "train", T), _find(out, "dense", "train", T), "tokens_per_s"),
            forward_speedup=ratio(_find(out, "dense", "forward", max(lens)), _find(out, "local", "forward", max(lens)),
                                  "seconds"), forward_seq_len=max(lens))
    sparse = sorted(n for n in names if n.startswith("sparse_"))
    if "dense" in names and sparse:
        T = max(lens)
        result["sparse_4x_less_memory"] = dict(
            seq_len=T, note="the seed says 16K; measured at the longest length run",
            forward_memory_ratio={n: ratio(_find(out, "dense", "forward", T), _find(out, n, "forward", T), "peak_bytes")
                                  for n in sparse},
            train_memory_ratio={n: ratio(_find(out, "dense", "train", T), _find(out, n, "train", T), "peak_bytes")
                                for n in sparse})
    gen = {g["model"]: g for g in out["generation"]}
    if {"dense_gqa", "mla"} <= names:
        T = max((t for t in lens if _find(out, "mla", "train", t) and _find(out, "dense_gqa", "train", t)), default=None)
        cache = {c["model"]: c["sizes"] for c in out.get("cache_sizes", [])}
        result["mla_vs_gqa_equal_params"] = dict(
            seq_len=T,
            train_speed_ratio=ratio(_find(out, "mla", "train", T), _find(out, "dense_gqa", "train", T), "tokens_per_s"),
            train_memory_ratio=ratio(_find(out, "dense_gqa", "train", T), _find(out, "mla", "train", T), "peak_bytes"),
            cache_ratio=(cache["dense_gqa"][0]["cache_bytes"] / cache["mla"][0]["cache_bytes"]
                         if "mla" in cache and "dense_gqa" in cache else None),
            decode_ms_ratio=(gen["mla"]["ms_per_token"] / gen["dense_gqa"]["ms_per_token"]
                             if "mla" in gen and "dense_gqa" in gen else None))
    if "dense" in gen and "mamba" in gen:
        result["ssm_5x_faster_inference"] = dict(
            context=gen["dense"]["context"],
            per_token_speedup=gen["dense"]["ms_per_token"] / gen["mamba"]["ms_per_token"],
            cache_ratio=gen["dense"]["cache_bytes"] / max(1, gen["mamba"]["cache_bytes"]),
            forward_speedup_longest=ratio(_find(out, "dense", "forward", max(lens)), _find(out, "mamba", "forward", max(lens)),
                                          "seconds"))
    return result


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def print_tables(out: dict) -> None:
    train_lens = out["meta"]["seq_lens"]
    fwd_lens = train_lens + out["meta"]["forward_only_lens"]
    params = {m["name"]: m["params"] for m in out["models"]}

    def cell(model, kind, T, fmt):
        r = next((r for r in out["results"] if r["model"] == model and r["kind"] == kind and r["seq_len"] == T), None)
        if r is None:
            return "-"
        return "skip" if r.get("skipped") else fmt(r)

    print(f"\ntraining step ({out['meta']['tokens_per_step']} tokens/step, AdamW): tokens/s | peak live MiB")
    print(f"{'model':20s} {'params':>9s} " + " ".join(f"{'T=' + str(T):>19s}" for T in train_lens))
    for name in params:
        cells = [cell(name, "train", T, lambda r: f"{r['tokens_per_s']:8.0f} | {r['peak_bytes'] / MIB:7.1f}")
                 for T in train_lens]
        print(f"{name:20s} {params[name]:9d} " + " ".join(f"{c:>19s}" for c in cells))
    print("\nforward (1 sequence, eval): ms | peak live MiB")
    print(f"{'model':20s} " + " ".join(f"{'T=' + str(T):>19s}" for T in fwd_lens))
    for name in params:
        cells = [cell(name, "forward", T, lambda r: f"{r['seconds'] * 1e3:8.1f} | {r['peak_bytes'] / MIB:7.1f}")
                 for T in fwd_lens]
        print(f"{name:20s} " + " ".join(f"{c:>19s}" for c in cells))
    if out["generation"]:
        g0 = out["generation"][0]
        print(f"\ngeneration after a {g0['context']}-token prompt ({g0['new_tokens']} tokens, greedy, cache)")
        print(f"{'model':20s} {'ms/token':>9s} {'prefill s':>10s} {'cache MiB':>10s}")
        for g in out["generation"]:
            print(f"{g['model']:20s} {g['ms_per_token']:9.2f} {g['prefill_s']:10.2f} {g['cache_bytes'] / MIB:10.2f}")
    if out["cache_sizes"]:
        lens = out["meta"]["cache_lens"]
        print("\ndecode cache of one sequence (MiB) at context length")
        print(f"{'model':20s} " + " ".join(f"{'T=' + str(T):>10s}" for T in lens))
        for c in out["cache_sizes"]:
            print(f"{c['model']:20s} " + " ".join(f"{s['cache_bytes'] / MIB:10.2f}" for s in c["sizes"]))
    if out["scan"]:
        print("\nMamba scan (batch 1): forward ms | forward+backward ms")
        for r in out["scan"]:
            print(f"  {r['impl']:10s} T={r['seq_len']:5d} {r['forward_s'] * 1e3:9.1f} | {r['fwd_bwd_s'] * 1e3:9.1f}"
                  f"   max |chunked - sequential| {r['max_abs_diff']:.1e}")
    print("\nthe seed's claims against these figures (ratios > 1 favour the claim):")
    for key, value in out["claims"].items():
        print(f"  {key}: {json.dumps(_rounded(value))}")
    m = out["meta"]
    print(f"\n{m['threads']} thread(s), load average {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}, "
          f"{m['wall_s']:.0f} s in all")


def _rounded(x):
    if isinstance(x, float):
        return round(x, 2)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def write_plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train", "tokens_per_s", "training tokens/s"), ("train", "peak_bytes", "training peak live MiB"),
              ("forward", "seconds", "forward latency (s)"), ("forward", "peak_bytes", "forward peak live MiB")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, (kind, key, title) in zip(axes.flat, panels):
        for m in out["models"]:
            rows = sorted((r for r in out["results"] if r["model"] == m["name"] and r["kind"] == kind
                           and not r.get("skipped")), key=lambda r: r["seq_len"])
            if rows:
                scale = 1 / MIB if key == "peak_bytes" else 1
                ax.plot([r["seq_len"] for r in rows], [r[key] * scale for r in rows], marker="o", label=m["name"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"architecture families, fp32 CPU, {out['meta']['threads']} threads, preset {out['meta']['preset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.bench archs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller sweep (defaults below in brackets)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--preset", default="small", help="preset of every family (default small; tests use debug)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help="training and forward lengths [512 2048 8192; quick 128 512]")
    p.add_argument("--forward-only-lens", type=int, nargs="*", default=None, help="forward-only lengths [16384; quick none]")
    p.add_argument("--tokens-per-step", type=int, default=None, help="training tokens per step [8192; quick 1024]")
    p.add_argument("--window", type=int, default=None, help="the local transformer's attn_window [256; quick 64]")
    p.add_argument("--gen-context", type=int, default=None, help="prompt length before decoding [4096; quick 512]")
    p.add_argument("--gen-tokens", type=int, default=None, help="tokens decoded one by one; 0 = no generation [32; quick 8]")
    p.add_argument("--scan-lens", type=int, nargs="*", default=None, help="Mamba scan lengths [512 2048; quick 128 512]")
    p.add_argument("--cache-lens", type=int, nargs="*", default=None,
                   help="context lengths of the decode-cache size table [4096 32768 131072; quick 512 4096 32768]")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions after one warm-up [3; quick 1]")
    p.add_argument("--case-budget-s", type=float, default=120.0,
                   help="skip a training length whose predicted time exceeds this (default 120)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write JSON here, and a PNG beside it (same name, .png)")
    args = p.parse_args(argv)
    full = dict(seq_lens=[512, 2048, 8192], forward_only_lens=[16384], tokens_per_step=8192, window=256,
                gen_context=4096, gen_tokens=32, scan_lens=[512, 2048], repeats=3, cache_lens=[4096, 32768, 131072])
    quick = dict(seq_lens=[128, 512], forward_only_lens=[], tokens_per_step=1024, window=64,
                 gen_context=512, gen_tokens=8, scan_lens=[128, 512], repeats=1, cache_lens=[512, 4096, 32768])
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("tokens_per_step", "window", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.gen_context < 1 or args.gen_tokens < 0:
        p.error("--gen-context must be >= 1 and --gen-tokens >= 0")
    if min([*args.seq_lens, *args.forward_only_lens, *args.scan_lens], default=1) < 2:
        p.error("--seq-lens/--forward-only-lens/--scan-lens: lengths must be >= 2")
    args.seq_lens = sorted(set(args.seq_lens))
    return args


def main(argv: list[str] | None = None, from_cli: bool = False) -> int:
    """`argv`: the arguments after `archs`; `from_cli`: restart with the caching malloc settings."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if from_cli:
        malloc.reexec_with_caching_malloc("jobs.bench")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"archs: {len(args.models)} models, preset {args.preset}, fp32 cpu, {torch.get_num_threads()} thread(s), "
          f"T={args.seq_lens}, {args.tokens_per_step} tokens/step", file=sys.stderr, flush=True)
    out = run(args)
    print_tables(out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        png = args.out.with_suffix(".png")
        write_plot(out, png)
        print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
