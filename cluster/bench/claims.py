"""The seed's claims, one generated report (`python -m jobs.bench claims --out docs/claims.md`).

  python -m jobs.bench claims --measure --quick            # the five measurements of seed_claims.py (minutes)
  python -m jobs.bench claims --out docs/claims.md         # the report, from whatever JSON exists

The report reads benchmark JSON only (no figure is typed here): `jobs.bench archs` (local window,
sparse memory, SSM generation, hierarchical memory), `jobs.bench tasks` (RNN hybrid,
cross-attention), `jobs.bench deploy` (4-bit size), `jobs.bench claims --measure` (MoE compute,
gradient checkpointing, Performer scaling, mixed precision numerics) and, where one exists, a GPU
figure for mixed-precision speed. Per claim: the seed's words (translated), what was measured and
how, the figure with its spread, and a verdict: holds / holds only under a stated condition /
does not hold / cannot be measured here; a claim whose JSON is missing says which command makes
it. Scaling curves are drawn as PNGs beside the report.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

HOLDS = "holds"
CONDITIONAL = "holds only under a condition"
FAILS = "does not hold"
UNMEASURABLE = "cannot be measured here"
MISSING = "no figure yet"
VERDICTS = (HOLDS, CONDITIONAL, FAILS, UNMEASURABLE, MISSING)


# ----------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------


@dataclass
class Fit:
    """y ~ offset + prefactor * x ** exponent over the fitted points."""

    exponent: float
    prefactor: float
    offset: float = 0.0
    r2: float = 1.0


def fit_power_law(x, y) -> Fit:
    """Least squares on log y = log a + p log x (no offset). Needs >= 2 points, all > 0."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or (x <= 0).any() or (y <= 0).any():
        raise ValueError(f"fit_power_law: needs >= 2 positive points, got x={x.tolist()} y={y.tolist()}")
    lx, ly = np.log(x), np.log(y)
    p, la = np.polyfit(lx, ly, 1)
    resid = ly - (la + p * lx)
    ss = ((ly - ly.mean()) ** 2).sum()
    return Fit(float(p), float(math.exp(la)), 0.0, float(1 - (resid ** 2).sum() / ss) if ss > 0 else 1.0)


def fit_power_law_offset(x, y, exponents=None) -> Fit:
    """y = c + a * x ** p with c, a >= 0: a constant part (weights, logits, per-call overhead) plus a
    scaling part, whose exponent is the one a complexity claim is about. Grid over p (linear least
    squares for c, a at each p), then the best p refined on a finer grid. Needs >= 3 points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or (x <= 0).any():
        raise ValueError(f"fit_power_law_offset: needs >= 3 points with x > 0, got x={x.tolist()}")

    def solve(p):
        A = np.stack([np.ones_like(x), x ** p], axis=1)
        (c, a), *_ = np.linalg.lstsq(A, y, rcond=None)
        if c < 0:  # the constant part cannot be negative: refit through the origin
            c, a = 0.0, float((x ** p) @ y / ((x ** p) @ (x ** p)))
        if a < 0:
            c, a = float(y.mean()), 0.0
        return float(((c + a * x ** p - y) ** 2).sum()), c, a

    grid = np.arange(0.05, 3.0001, 0.01) if exponents is None else np.asarray(exponents, float)
    best = min(grid, key=lambda p: solve(p)[0])
    fine = np.arange(max(0.0, best - 0.01), best + 0.01, 0.0005)
    best = min(fine, key=lambda p: solve(p)[0])
    sse, c, a = solve(best)
    ss = ((y - y.mean()) ** 2).sum()
    return Fit(float(best), a, c, float(1 - sse / ss) if ss > 0 else 1.0)


def exponent_spread(x, y_repeats: list[list[float]]) -> dict:
    """Power-law exponent fitted to each repeat (y_repeats[i][j]: repeat j at x[i]): median, min, max."""
    runs = len(y_repeats[0])
    ps = [fit_power_law(x, [ys[j] for ys in y_repeats]).exponent for j in range(runs)]
    return dict(median=statistics.median(ps), min=min(ps), max=max(ps), runs=runs)


def spread(values: list[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values), n=len(values))


# ----------------------------------------------------------------------------------------------
# Claims
# ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    verdict: str
    figure: str  # the measured figure with its spread, one line
    method: str = ""  # what was measured and how (command, shapes, seeds)
    detail: list[str] = field(default_factory=list)  # more lines (tables, conditions)
    plots: list[str] = field(default_factory=list)  # PNG file names beside the report


@dataclass
class Claim:
    key: str
    zh: str  # the seed's words
    en: str  # translated
    source: str  # which input: archs | tasks | deploy | seed | none
    command: str  # what produces that input
    evaluate: Callable[[dict, Path], Result]


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _find(archs: dict, model: str, kind: str, T: int) -> dict | None:
    for r in archs["results"]:
        if r["model"] == model and r["kind"] == kind and r["seq_len"] == T and not r.get("skipped"):
            return r
    return None


def _archs_note(archs: dict) -> str:
    m = archs["meta"]
    return (f"`jobs.bench archs`{' --quick' if m.get('quick') else ''}: `{m['preset']}` presets, fp32, "
            f"{m['threads']} threads, {m['tokens_per_step']} tokens per training step, fastest of {m['repeats']} "
            f"repetitions, lengths {m['seq_lens']} (+ forward only {m.get('forward_only_lens') or []}), load average "
            f"{m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}")


def local_window(inputs: dict, out_dir: Path) -> Result:
    c = inputs["archs"]["claims"].get("local_window_3x_faster")
    if not c or c.get("forward_speedup") is None:
        return Result(MISSING, "the archs JSON has no dense/local pair")
    fwd, train, T = c["forward_speedup"], c["train_speedup"], c["forward_seq_len"]
    lens = sorted({r["seq_len"] for r in inputs["archs"]["results"] if r["kind"] == "forward"})
    per_T = {t: _find(inputs["archs"], "dense", "forward", t)["seconds"] / _find(inputs["archs"], "local", "forward", t)["seconds"]
             for t in lens if _find(inputs["archs"], "dense", "forward", t) and _find(inputs["archs"], "local", "forward", t)}
    reach = [t for t, s in per_T.items() if s >= 3]
    verdict = HOLDS if all(s >= 3 for s in per_T.values()) else CONDITIONAL if reach else FAILS
    figure = f"forward {fwd:.2f}x faster than dense at T={T}; training {train:.2f}x at T={c['seq_len']}"
    detail = ["forward speed-up by length: " + ", ".join(f"T={t}: {s:.2f}x" for t, s in per_T.items())]
    if verdict == CONDITIONAL:
        detail.append(f"condition: the sequence is long against the window (3x reached from T={min(reach)})")
    return Result(verdict, figure, _archs_note(inputs["archs"]) + f"; window {inputs['archs']['meta']['window']}", detail)


def hierarchical_memory(inputs: dict, out_dir: Path) -> Result:
    archs = inputs["archs"]
    lens = sorted({r["seq_len"] for r in archs["results"] if r["kind"] == "train" and not r.get("skipped")})
    cuts = {}
    for kind in ("train", "forward"):
        for t in sorted({r["seq_len"] for r in archs["results"] if r["kind"] == kind}):
            d, h = _find(archs, "dense", kind, t), _find(archs, "hourglass", kind, t)
            if d and h:
                cuts[(kind, t)] = 1 - h["peak_bytes"] / d["peak_bytes"]
    if not cuts:
        return Result(MISSING, "the archs JSON has no dense/hourglass pair")
    train = [v for (k, _), v in cuts.items() if k == "train"]
    figure = (f"hourglass vs dense peak live memory: training {_pct(-statistics.median(train))} (median over T "
              f"{lens}, range {_pct(-max(train))} .. {_pct(-min(train))})" if train else "")
    detail = ["memory change by case: " + ", ".join(f"{k} T={t}: {_pct(-v)}" for (k, t), v in cuts.items()),
              "the seed's 1B-parameter model is not built here; these are the ~3M-parameter `small` presets"]
    best = max(cuts.values())
    verdict = HOLDS if min(cuts.values()) >= 0.4 else CONDITIONAL if best >= 0.4 else FAILS
    return Result(verdict, figure, _archs_note(archs) + "; hourglass k=2 (mean pooling, repeat upsampling)", detail)


def sparse_memory(inputs: dict, out_dir: Path) -> Result:
    c = inputs["archs"]["claims"].get("sparse_4x_less_memory")
    if not c:
        return Result(MISSING, "the archs JSON has no sparse models")
    fwd = {k: v for k, v in c["forward_memory_ratio"].items() if v}
    T = c["seq_len"]
    figure = f"dense / sparse forward peak memory at T={T}: " + ", ".join(f"{k} {v:.2f}x" for k, v in fwd.items())
    verdict = HOLDS if fwd and min(fwd.values()) >= 4 else CONDITIONAL if fwd and max(fwd.values()) >= 4 else FAILS
    detail = ["the seed: 12 GB -> 3 GB (4x) at 16K tokens; the dense model's attention is a fused kernel "
              "(scaled_dot_product_attention) that never holds the T x T scores, so its memory is linear in T too"]
    if T < 16384:
        detail.append(f"measured up to T={T} only, not the seed's 16K")
    return Result(verdict, figure, _archs_note(inputs["archs"]), detail)


def ssm_speed(inputs: dict, out_dir: Path) -> Result:
    c = inputs["archs"]["claims"].get("ssm_5x_faster_inference")
    if not c:
        return Result(MISSING, "the archs JSON has no generation figures for dense and mamba (--gen-tokens)")
    s, fwd = c["per_token_speedup"], c.get("forward_speedup_longest")
    figure = f"decoding {s:.2f}x dense's speed per token after {c['context']} tokens; state {c['cache_ratio']:.0f}x smaller than the KV cache"
    if fwd:
        figure += f"; forward at the longest length {fwd:.2f}x"
    verdict = HOLDS if s >= 5 else CONDITIONAL if (fwd or 0) >= 5 else FAILS
    return Result(verdict, figure, _archs_note(inputs["archs"]) + "; batch 1 greedy decoding, CPU",
                  ["a memory-bound GPU decoder is where a small state pays; not measured here"])


def rnn_hybrid(inputs: dict, out_dir: Path) -> Result:
    t = inputs["tasks"]
    rows = {r["model"]: r for r in t["forecast"]}
    hybrid, plain = t["forecast"][0], t["forecast"][1]
    change = t["claims"]["hybrid_mae_change_vs_plain"]
    hm, pm = hybrid["mae_ppm"], plain["mae_ppm"]
    figure = (f"MAE {_pct(change)} vs the plain transformer ({hybrid['model']} {hm['mean']:.2f} +- {hm['std']:.2f} ppm, "
              f"{plain['model']} {pm['mean']:.2f} +- {pm['std']:.2f})")
    verdict = HOLDS if change <= -0.18 else FAILS  # the claim is the size of the gain
    s = t["settings"]
    sizes = ", ".join(f"{k} {v['params']:,}" for k, v in rows.items())
    method = (f"`jobs.bench tasks`: CO2 weekly series, {s['forecast_steps']} steps, {s['seeds']} seeds, batch {s['batch']}, "
              f"{s['threads']} thread; models of equal size ({sizes})")
    gap = abs(hm["mean"] - pm["mean"]) / max(hm["std"], pm["std"], 1e-12)
    detail = [f"the gap is {gap:.1f} standard deviations (over seeds) of the noisier model"]
    return Result(verdict, figure, method, detail)


def cross_attention(inputs: dict, out_dir: Path) -> Result:
    t = inputs["tasks"]
    change = t["claims"]["cross_attention_match_acc_change_vs_dual_tower"]
    by = {r["variant"]: r for r in t["fusion"]}
    figure = (f"matching accuracy {100 * change:+.1f} points vs the dual tower (cross {by['cross_attention']['match_acc']['mean']:.3f} "
              f"+- {by['cross_attention']['match_acc']['std']:.3f}, dual {by['dual_tower']['match_acc']['mean']:.3f} "
              f"+- {by['dual_tower']['match_acc']['std']:.3f})")
    s = t["settings"]
    verdict = HOLDS if change >= 0.24 else FAILS
    return Result(verdict, figure, f"`jobs.bench tasks`: 8x8 digits with label captions, {s['fusion_steps']} steps, "
                  f"{s['seeds']} seeds, batch {s['batch']}; match among the 10 class captions")


def _model_name(row: dict) -> str:
    """A model row's name: `jobs.bench deploy` writes it as "arch"."""
    return row.get("name") or row.get("model") or row.get("arch", "?")


def int4_size(inputs: dict, out_dir: Path) -> Result:
    rows = inputs["deploy"]["models"]
    ratios = {_model_name(r): r["ratio_vs_fp32"]["int4"] for r in rows}
    figure = "int4 file size: " + ", ".join(f"{k} {v:.2f}x smaller than fp32" for k, v in ratios.items())
    ppl = {_model_name(r): (r["val_ppl"]["fp32"], r["val_ppl"]["int4"]) for r in rows}
    detail = ["validation perplexity fp32 -> int4: " + ", ".join(f"{k} {a:.3f} -> {b:.3f}" for k, (a, b) in ppl.items()),
              "8x is the ratio of the weights alone (32 bits -> 4); scales, and the norms, router gates and "
              "embedding kept in fp32, take the rest"]
    verdict = HOLDS if min(ratios.values()) >= 8 else CONDITIONAL if max(ratios.values()) >= 8 else FAILS
    return Result(verdict, figure, f"`jobs.bench deploy`: `default` and `moe_small` trained {inputs['deploy']['train_steps']} "
                  "steps, torchao weight-only int4 (groups of 32), two values per byte, fp16 scales", detail)


def moe_compute(inputs: dict, out_dir: Path) -> Result:
    m = inputs["seed"]["moe_compute"]
    rows = m["models"]
    moe = rows["moe_top2"]
    detail, lines = [], []
    verdicts = {}
    for ref in ("dense_equal_total_params", "dense_equal_active_flops"):
        d = rows[ref]
        flop_cut = 1 - moe["forward_flops_per_token"] / d["forward_flops_per_token"]
        time_cuts = [1 - a / b for a, b in zip(moe["seconds"], d["seconds"])]  # interleaved repeats, pairwise
        t = spread(time_cuts)
        lines.append(f"vs {ref.replace('_', ' ')} ({d['parameters']:,} params): FLOPs {_pct(-flop_cut)}, "
                     f"forward time {_pct(-t['median'])} (range {_pct(-t['max'])} .. {_pct(-t['min'])})")
        verdicts[ref] = flop_cut >= 0.6  # the claim is about computation (FLOPs); time is reported beside it
        if flop_cut >= 0.6 and t["median"] < 0.6:
            detail.append(f"vs {ref.replace('_', ' ')}: the measured time cut ({_pct(-t['median'])}) is smaller than "
                          "the FLOP cut: the CPU expert path (router, permutation, grouped GEMM) does less per second "
                          "than one dense matmul")
    figure = "; ".join(lines)
    verdict = HOLDS if all(verdicts.values()) else CONDITIONAL if any(verdicts.values()) else FAILS
    if verdict == CONDITIONAL:
        detail.append("condition: against the dense model of equal total parameters (the claim's comparison); "
                      "against a dense model of equal active FLOPs the MoE saves nothing (it adds the router)")
    detail.append(f"MoE: {moe['parameters']:,} params, {m['experts']} experts of hidden {m['expert_hidden']}, top-{m['top_k']}; "
                  f"FLOPs per token: matmul 2 x active parameters + causal attention")
    return Result(verdict, figure, f"`jobs.bench claims --measure`: `small` presets, forward (eval) of {m['batch']} x "
                  f"{m['seq_len']} tokens, fp32 CPU, backend {m['backend']}, {m['repeats']} interleaved repeats" + _seed_note(inputs, "moe_compute"),
                  detail)


def _seed_note(inputs: dict, part: str) -> str:
    """Quick mode, threads and load of the run that measured `part` (a --parts run keeps the meta of
    the run before it as previous_meta)."""
    meta = inputs["seed"]["meta"]
    while part not in meta.get("parts", [part]) and meta.get("previous_meta"):
        meta = meta["previous_meta"]
    return (f"; {'quick mode, ' if meta.get('quick') else ''}{meta['threads']} threads, load average "
            f"{meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f}")


def mixed_precision(inputs: dict, out_dir: Path) -> Result:
    runs = inputs["seed"]["mixed_precision"]["runs"]
    ref = np.array(runs["fp32"]["losses"])
    diffs = {p: float(np.max(np.abs(np.array(r["losses"]) - ref) / ref)) for p, r in runs.items() if p != "fp32"}
    figure = "numerics: the largest relative gap to the fp32 loss curve: " + ", ".join(
        f"{p} {100 * d:.3f}%" for p, d in diffs.items())
    gpu = inputs.get("gpu")
    detail = [f"fp32 loss {ref[0]:.4f} -> {ref[-1]:.4f} over {len(ref)} steps"]
    mp = inputs["seed"]["mixed_precision"]
    method = f"`jobs.bench claims --measure`: {mp['model']}, {mp['batch']} per step, AdamW, the same init and batches" + _seed_note(inputs, "mixed_precision")
    if gpu and "mixed_precision_speedup" in gpu:
        s = gpu["mixed_precision_speedup"]
        figure += f"; speed on {gpu.get('device', 'GPU')}: {s:.2f}x"
        return Result(HOLDS if 2 <= s else FAILS, figure, method, detail)
    detail.append("speed: a tensor-core question; bf16 matmuls on this CPU are slower than fp32 (no bf16 units), so "
                  "a CPU figure says nothing of it. A GPU JSON with `mixed_precision_speedup` (fp32 step time over "
                  "bf16 step time, same model) makes this verdict")
    return Result(UNMEASURABLE, figure, method, detail)


def checkpointing(inputs: dict, out_dir: Path) -> Result:
    c = inputs["seed"]["checkpointing"]
    depths = [r["depth"] for r in c["rows"]]
    fits = {mode: fit_power_law_offset(depths, [r[mode] for r in c["rows"]]) for mode in ("none", "per_block", "sqrt_segments")}
    plot = _plot(out_dir, "claims_checkpointing.png", "activation memory of a training step vs depth",
                 "depth (blocks)", "peak live activation MiB",
                 {f"{m} (p={f.exponent:.2f})": (depths, [r[m] / 2 ** 20 for r in c["rows"]], f, 2 ** -20)
                  for m, f in fits.items()})
    figure = "fitted exponent of depth (y = c + a n^p): " + ", ".join(f"{m} {f.exponent:.2f}" for m, f in fits.items())
    sqrt_ok = fits["sqrt_segments"].exponent <= 0.65
    per_block_ok = fits["per_block"].exponent <= 0.65
    verdict = HOLDS if per_block_ok else CONDITIONAL if sqrt_ok else FAILS
    detail = ["peak MiB by depth: " + "; ".join(
        f"n={r['depth']}: none {r['none'] / 2**20:.1f}, per block {r['per_block'] / 2**20:.1f}, "
        f"segments of {r['segment']} {r['sqrt_segments'] / 2**20:.1f}" for r in c["rows"])]
    if verdict == CONDITIONAL:
        detail.append("condition: checkpoints every ~sqrt(n) blocks (segments); raymoe's `activation_checkpointing` "
                      "(every block) keeps each block's input, O(n) with a smaller constant")
    last = c["rows"][-1]
    if last["per_block"] < last["sqrt_segments"]:
        detail.append(f"in bytes, per-block checkpointing is still the lower at n={last['depth']} "
                      f"({last['per_block'] / 2**20:.1f} vs {last['sqrt_segments'] / 2**20:.1f} MiB): a block's input is "
                      "small against one segment's recomputed activations until n is far larger")
    return Result(verdict, figure, f"`jobs.bench claims --measure`: transformer d_model {c['d_model']}, {c['batch']} x "
                  f"{c['seq_len']} tokens, {c['method']}" + _seed_note(inputs, "checkpointing"), detail, [plot] if plot else [])


def performer(inputs: dict, out_dir: Path) -> Result:
    p = inputs["seed"]["performer"]
    curves, fits, detail = {}, {}, []
    for model in ("performer", "dense"):
        rows = [r for r in p["rows"] if r["model"] == model]
        T = [r["seq_len"] for r in rows]
        fits[(model, "time")] = exponent_spread(T, [r["seconds"] for r in rows])
        fits[(model, "memory")] = fit_power_law_offset(T, [r["peak_bytes"] for r in rows])
        curves[model] = (T, rows)
    plots = [_plot(out_dir, "claims_performer_time.png", "forward time vs sequence length", "T", "seconds",
                   {f"{m} (p={fits[(m, 'time')]['median']:.2f})": (T, [r["seconds_median"] for r in rows], None, 1)
                    for m, (T, rows) in curves.items()}),
             _plot(out_dir, "claims_performer_memory.png", "forward peak live memory vs sequence length", "T", "MiB",
                   {f"{m} (p={fits[(m, 'memory')].exponent:.2f})": (T, [r["peak_bytes"] / 2 ** 20 for r in rows], None, 1)
                    for m, (T, rows) in curves.items()})]
    t, mem = fits[("performer", "time")], fits[("performer", "memory")]
    figure = (f"performer time ~ T^{t['median']:.2f} (per repeat {t['min']:.2f} .. {t['max']:.2f}), memory ~ T^{mem.exponent:.2f} "
              f"(offset fit); dense time ~ T^{fits[('dense', 'time')]['median']:.2f}, memory ~ T^{fits[('dense', 'memory')].exponent:.2f}")
    T = curves["performer"][0]
    detail.append(f"T = {T[0]} .. {T[-1]}, batch 1, eval forward; time exponent: log-log fit over the lengths")
    verdict = HOLDS if t["median"] <= 1.2 and mem.exponent <= 1.2 else FAILS
    return Result(verdict, figure, f"`jobs.bench claims --measure`: `small` performer and transformer presets, fp32, "
                  f"{p['repeats']} interleaved repeat(s)" + _seed_note(inputs, "performer"), detail, [x for x in plots if x])


def _plot(out_dir: Path | None, name: str, title: str, xlabel: str, ylabel: str, series: dict) -> str | None:
    """A log-log PNG of the series {label: (x, y, Fit or None, scale)} in out_dir; its file name
    (None without an out_dir: verdicts only)."""
    if out_dir is None:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, (x, y, f, scale) in series.items():
        line, = ax.plot(x, y, "o-" if f is None else "o", label=label)
        if f is not None:  # the fit, in the plotted unit (y = scale x fitted quantity)
            xs = np.geomspace(min(x), max(x), 50)
            ax.plot(xs, scale * (f.offset + f.prefactor * xs ** f.exponent), "-", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def unmeasurable(why: str) -> Callable[[dict, Path], Result]:
    return lambda inputs, out_dir: Result(UNMEASURABLE, "-", "", [why])


CLAIMS = [
    Claim("hierarchical_memory", "以10亿参数规模模型为例,采用分层注意力架构可将内存占用降低40%",
          "Taking a 1-billion-parameter model as an example, a hierarchical attention architecture can reduce "
          "memory use by 40%.", "archs", "python -m jobs.bench archs --out bench_results/archs_cpu.json",
          hierarchical_memory),
    Claim("mixed_precision", "混合精度训练技术能使计算速度提升2-3倍",
          "Mixed-precision training can make computation 2-3x faster.", "seed",
          "python -m jobs.bench claims --measure --out bench_results/claims_cpu.json", mixed_precision),
    Claim("local_window", "通过引入局部注意力窗口(如Swin Transformer),将复杂度从O(n²)降至O(n),在保持长序列建模能力的同时,使推理速度提升3倍",
          "Introducing a local attention window (as in Swin Transformer) lowers the complexity from O(n^2) to O(n) "
          "and, while keeping long-sequence modelling, makes inference 3x faster.", "archs",
          "python -m jobs.bench archs --out bench_results/archs_cpu.json", local_window),
    Claim("hierarchical_codegen", "某研究显示,分层架构在代码生成任务中可提升准确率12%",
          "One study shows a hierarchical architecture can raise accuracy on code generation by 12%.", "none", "",
          unmeasurable("needs a code-generation benchmark (HumanEval-style pass@1) on models trained on code; "
                       "nothing here trains on code")),
    Claim("moe_top2_compute", "某平台最新架构采用Top-2路由策略,在保持模型容量的同时,将单步推理计算量降低60%",
          "A platform's latest architecture uses Top-2 routing, keeping model capacity while cutting the "
          "computation of a single inference step by 60%.", "seed",
          "python -m jobs.bench claims --measure --out bench_results/claims_cpu.json", moe_compute),
    Claim("sparse_memory", "在16K序列长度下,稀疏架构可使内存占用从12GB降至3GB",
          "At a sequence length of 16K, a sparse architecture lowers memory use from 12 GB to 3 GB.", "archs",
          "python -m jobs.bench archs --out bench_results/archs_cpu.json", sparse_memory),
    Claim("performer_linear", "典型方案如Performer架构……该架构在保持O(n)复杂度的同时,需注意特征映射的近似误差控制",
          "A typical scheme is the Performer ... it keeps O(n) complexity, while the approximation error of the "
          "feature map needs watching.", "seed",
          "python -m jobs.bench claims --measure --out bench_results/claims_cpu.json", performer),
    Claim("rnn_hybrid_mae", "某研究提出的Transformer-RNN混合架构在时序预测任务中,将MAE(平均绝对误差)降低18%",
          "A Transformer-RNN hybrid proposed by one study lowers MAE (mean absolute error) by 18% on time-series "
          "forecasting.", "tasks", "python -m jobs.bench tasks --out bench_results/tasks_cpu.json", rnn_hybrid),
    Claim("ssm_speed", "在相同参数规模下,SSM架构的推理速度比标准Transformer快5倍",
          "At the same parameter count, an SSM architecture infers 5x faster than a standard Transformer.", "archs",
          "python -m jobs.bench archs --out bench_results/archs_cpu.json", ssm_speed),
    Claim("cross_attention_match", "交叉注意力机制可使图文匹配准确率提升24%",
          "Cross-attention can raise image-text matching accuracy by 24%.", "tasks",
          "python -m jobs.bench tasks --out bench_results/tasks_cpu.json", cross_attention),
    Claim("checkpointing_sqrt", "使用梯度检查点(Gradient Checkpointing)将内存占用从O(n)降至O(√n)",
          "Gradient checkpointing lowers memory use from O(n) to O(sqrt(n)).", "seed",
          "python -m jobs.bench claims --measure --out bench_results/claims_cpu.json", checkpointing),
    Claim("int4_size", "4位量化可使模型体积缩小8倍,但需验证任务精度损失",
          "4-bit quantization makes the model 8x smaller, but the task accuracy loss must be checked.", "deploy",
          "python -m jobs.bench deploy --out bench_results/deploy_cpu.json", int4_size),
]


def evaluate(inputs: dict, out_dir: Path | None) -> list[tuple[Claim, Result]]:
    """Each claim's result; a claim whose input is missing (or lacks its figures) gets MISSING.
    PNGs go to `out_dir` (None: none drawn)."""
    out = []
    for claim in CLAIMS:
        if claim.source != "none" and inputs.get(claim.source) is None:
            out.append((claim, Result(MISSING, "-", "", [f"run `{claim.command}`"])))
            continue
        try:
            res = claim.evaluate(inputs, out_dir)
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
            res = Result(MISSING, "-", "", [f"the {claim.source} JSON lacks this claim's figures ({type(e).__name__}: {e}); "
                                            f"run `{claim.command}`"])
        out.append((claim, res))
    return out


def render(results: list[tuple[Claim, Result]], sources: dict[str, str]) -> str:
    lines = ["# The seed's claims, measured", "",
             "Generated by `python -m jobs.bench claims --out docs/claims.md` from benchmark JSON (no figure typed by "
             "hand). Verdicts: *holds*, *holds only under a condition* (stated), *does not hold*, *cannot be measured "
             "here* (and what would measure it), *no figure yet* (the command that makes one). The claims are those "
             "of the project's seed survey (Chinese), quoted and translated.", "",
             "Inputs: " + ", ".join(f"`{k}`: {v}" for k, v in sources.items()), "",
             "| claim | the seed says | measured | verdict |", "|---|---|---|---|"]
    for claim, r in results:
        lines.append(f"| [{claim.key}](#{claim.key.replace('_', '-')}) | {claim.en} | {r.figure} | **{r.verdict}** |")
    for claim, r in results:
        lines += ["", f"## {claim.key}", "", f"> {claim.zh}", ">", f"> {claim.en}", "",
                  f"**Verdict: {r.verdict}.** {r.figure}", ""]
        if r.method:
            lines.append(f"Measured: {r.method}.")
        if claim.command:
            lines.append(f"Command: `{claim.command}`.")
        lines += [f"- {d}" for d in r.detail]
        lines += [f"\n![{p}](claims/{p})" for p in r.plots]
    return "\n".join(lines) + "\n"


DEFAULT_INPUTS = {"archs": "bench_results/archs_cpu.json", "tasks": "bench_results/tasks_cpu.json",
                  "deploy": "bench_results/deploy_cpu.json", "seed": "bench_results/claims_cpu.json",
                  "gpu": "bench_results/claims_gpu.json"}


def load_inputs(paths: dict[str, str]) -> tuple[dict, dict[str, str]]:
    inputs, sources = {}, {}
    for key, path in paths.items():
        p = Path(path)
        if not p.is_file():
            inputs[key], sources[key] = None, f"{path} (absent)"
            continue
        try:
            inputs[key] = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON ({e}); re-run the benchmark that writes it")
        sources[key] = str(path)
    return inputs, sources


def main(argv=None, from_cli: bool = False) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench claims", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="run the measurements of cluster/bench/seed_claims.py")
    p.add_argument("--quick", action="store_true", help="with --measure: fewer repeats and depths, smaller batches")
    p.add_argument("--parts", nargs="+", default=None, help="with --measure: only these measurements, merged into the "
                                                             "existing --out JSON (moe_compute checkpointing performer mixed_precision)")
    p.add_argument("--out", default=None, help="--measure: the JSON (default bench_results/claims_cpu.json); "
                                                "else the report (default docs/claims.md; PNGs go to its claims/ folder)")
    for key, path in DEFAULT_INPUTS.items():
        p.add_argument(f"--{key}", default=path, help="input JSON (default: %(default)s)")
    args = p.parse_args(argv)
    if args.measure:
        from cluster.bench.seed_claims import measure

        from cluster.bench.seed_claims import PARTS

        out = Path(args.out or DEFAULT_INPUTS["seed"])
        parts = tuple(args.parts or PARTS)
        unknown = set(parts) - set(PARTS)
        if unknown:
            p.error(f"--parts: unknown {sorted(unknown)}; valid: {' '.join(PARTS)}")
        previous = json.loads(out.read_text()) if args.parts and out.is_file() else None
        result = measure(args.quick, parts, previous)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"[claims] wrote {out} ({result['meta']['wall_s']:.0f} s)")
        return 0
    out = Path(args.out or "docs/claims.md")
    inputs, sources = load_inputs({k: getattr(args, k) for k in DEFAULT_INPUTS})
    results = evaluate(inputs, out.parent / "claims")
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "claims").mkdir(parents=True, exist_ok=True)
    for key, data in inputs.items():  # the report's inputs beside it, so every figure can be traced
        if data is not None:
            (out.parent / "claims" / f"input_{key}.json").write_text(json.dumps(data, indent=1))
            sources[key] += f" (copied to {out.parent.name}/claims/input_{key}.json)"
    out.write_text(render(results, sources))
    width = max(len(c.key) for c, _ in results)
    for claim, r in results:
        print(f"{claim.key:{width}s}  {r.verdict:30s}  {r.figure[:100]}")
    print(f"[claims] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
