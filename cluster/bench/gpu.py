"""The prepared GPU check: one command, one GPU, a few minutes, no Ray (`python -m jobs.bench gpu`).

  python -m jobs.bench gpu --out DIR                  # on a CUDA machine: DIR/gpu_check.json
  python -m jobs.bench gpu --device cpu --tiny --out DIR   # the skeleton at tiny shapes (a test runs it)

Parts (each one that cannot run writes why into the JSON and the others go on):
  a  kernels: pure-bf16 grouped SwiGLU experts forward+backward on expert-sorted rows at the
     coarse (E 8, k 2, F 1024) and fine (E 64, k 8, F 256) shapes, T 16384, d 1024, for every
     backend that loads, and the dense SwiGLU of equal FLOPs (hidden k x F): ms, TFLOP/s, ratio
  b  the MoE layer as training runs it: fp32 master weights, fp32 input, bf16 autocast, router,
     dispatch, experts, combine, losses; the GEMM operand dtypes it produced; vs the dense SwiGLU
     under the same autocast
  c  the training step (cluster/train/step.py's train_step, the function the Ray worker loop
     calls, run in this process at world size 1) of `moe_small` and of a ~1 B-parameter MoE
     (16 experts, top-2), bf16: tokens/s and MFU against the accelerator's peak
  d  which SDPA kernel ran for dense causal attention and for the local-window attention (an
     explicit mask rules flash out)
  e  mamba_ssm's fused scan against the chunked scan, if it imports
  f  bitsandbytes NF4 quantize + cached generation, if it imports

Nothing here imports Ray (the GPU machine has none); a test checks that. Runs on torch 2.11+.
Expert parallelism over NCCL needs two GPUs and is not part of this check.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

PARTS = "abcdef"
# Dense bf16 tensor-core peak FLOP/s by device name (vendor datasheets, no sparsity).
# NOTE: a copy of the main table's bf16 figures (cluster.train.metrics.ACCELERATORS), kept here
# because that module imports prometheus_client and pyarrow, which the lent GPU machine lacks;
# keep the two in step by hand.

FULL = {
    "kernel_shapes": {"coarse": dict(tokens=16384, d_model=1024, num_experts=8, top_k=2, expert_hidden=1024),
                      "fine": dict(tokens=16384, d_model=1024, num_experts=64, top_k=8, expert_hidden=256)},
    "repeats": 10, "warmup": 3, "train_steps": 10, "train_warmup": 3,
    "attention": dict(batch=4, heads=16, seq=4096, head_dim=64, window=512),
    "mamba": dict(batch=2, seq=2048, heads=16, head_dim=64, d_state=64, chunk=64),
}
TINY = {  # CPU smoke: bf16 GEMMs are very slow on CPUs, so everything is a few rows wide
    "kernel_shapes": {"coarse": dict(tokens=32, d_model=16, num_experts=4, top_k=2, expert_hidden=16),
                      "fine": dict(tokens=32, d_model=16, num_experts=8, top_k=4, expert_hidden=8)},
    "repeats": 1, "warmup": 0, "train_steps": 1, "train_warmup": 1, "layer_backends": ["auto", "padded"],
    "attention": dict(batch=1, heads=2, seq=64, head_dim=16, window=16),
    "mamba": dict(batch=1, seq=32, heads=2, head_dim=8, d_state=8, chunk=8),
}
# `moe_small` as jobs/configs/moe_small.yaml, and a ~1 B-parameter MoE (16 experts, top-2; 12
# layers of d 1024, experts of hidden 1536: 0.91 B expert, ~1.0 B total parameters).
TRAIN_CONFIGS = {
    "moe_small": dict(overrides=[], vocab=256, batch=16, micro=8),
    "moe_1b": dict(overrides=["model.d_model=1024", "model.n_layers=12", "model.n_heads=16", "model.max_seq_len=1024",
                              "data.seq_len=1024", "model.moe.num_experts=16", "model.moe.top_k=2",
                              "model.moe.expert_hidden=1536"], vocab=32000, batch=16, micro=8),
}
TINY_TRAIN = {"moe_debug": dict(overrides=["data.seq_len=16"], config="moe_debug", vocab=64, batch=4, micro=2)}


class Skipped(Exception):
    """A part that cannot run here; the message says why."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of `fn()` (synchronised) after `warmup` untimed calls."""
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_peak(device: torch.device) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, where it came from) for the MFU denominator."""
    if device.type != "cuda":
        return None, f"no peak table entry for {device.type}"
    from cluster.train.metrics import known_accelerator  # the one table the training MFU uses too

    name = torch.cuda.get_device_name(device)
    entry = known_accelerator(name)
    if entry is not None:
        return entry.bf16_dense_flops, f"{name}: {entry.name} dense bf16 datasheet peak ({entry.source})"
    return None, f"{name} is not in the peak table"


def balanced_sizes(rows: int, groups: int, device) -> torch.Tensor:
    """Group sizes as even as possible (a balanced router's load)."""
    sizes = torch.full((groups,), rows // groups, dtype=torch.int64)
    sizes[: rows % groups] += 1
    return sizes.to(device)


# --- a: kernels --------------------------------------------------------------------------------

def part_kernels(cfg: dict, device: torch.device) -> dict:
    from kernels import available_backends
    from moe.experts import GroupedExperts, SwiGLU

    dtype = torch.bfloat16
    rows = []
    backends = available_backends(device, dtype)
    for name, s in cfg["kernel_shapes"].items():
        T, d, E, k, F = s["tokens"], s["d_model"], s["num_experts"], s["top_k"], s["expert_hidden"]
        flops = 3 * 3 * 2 * T * k * d * F  # 3 GEMMs (gate, up, down), forward + 2 in backward
        x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
        dense = SwiGLU(d, k * F).to(device=device, dtype=dtype)

        def dense_step():
            dense.zero_grad(set_to_none=True)
            dense(x).float().square().mean().backward()

        dense_s = timed(dense_step, device, cfg["repeats"], cfg["warmup"])
        rows.append(dict(shape=name, backend="dense", ms=dense_s * 1e3, tflops=flops / dense_s / 1e12, ratio_to_dense=1.0, **s))
        x_rows = torch.randn(T * k, d, device=device, dtype=dtype, requires_grad=True)
        sizes = balanced_sizes(T * k, E, device)
        weight = torch.rand(T * k, device=device)
        for backend in backends:
            try:
                experts = GroupedExperts(E, d, F, backend).to(device=device, dtype=dtype)
                experts.init_weights(0.02, 0.02)

                def moe_step():
                    experts.zero_grad(set_to_none=True)
                    experts(x_rows, sizes, weight).float().square().mean().backward()

                s_ = timed(moe_step, device, cfg["repeats"], cfg["warmup"])
                rows.append(dict(shape=name, backend=backend, ms=s_ * 1e3, tflops=flops / s_ / 1e12,
                                 ratio_to_dense=dense_s / s_, **s))
            except Exception as err:  # noqa: BLE001 - one backend failing must not hide the others
                rows.append(dict(shape=name, backend=backend, error=f"{type(err).__name__}: {err}"))
            _progress(f"a {name} {rows[-1]['backend']}: " + (f"{rows[-1]['ms']:.2f} ms" if "ms" in rows[-1] else rows[-1]["error"]))
        del x, x_rows, dense
    return {"backends_loaded": backends, "results": rows,
            "note": "pure bf16 operands; FLOPs count 3 GEMMs x (forward + 2 backward)"}


# --- b: the MoE layer under autocast -------------------------------------------------------------

def part_layer(cfg: dict, device: torch.device) -> dict:
    from cluster.train.precision import GemmDtypeRecorder, autocast
    from kernels import available_backends
    from moe.config import MoEConfig
    from moe.experts import SwiGLU
    from moe.layer import MoELayer

    rows = []
    targets = {"coarse": 0.9, "fine": 0.7}  # issue 21: the MoE layer vs the dense FFN on an H200
    backends = cfg.get("layer_backends") or ["auto"] + available_backends(device, torch.bfloat16)
    for name, s in cfg["kernel_shapes"].items():
        T, d = s["tokens"], s["d_model"]
        x = torch.randn(1, T, d, device=device, requires_grad=True)  # fp32, as RMSNorm hands it over
        dense = SwiGLU(d, s["top_k"] * s["expert_hidden"]).to(device)

        def step(module):
            def run():
                module.zero_grad(set_to_none=True)
                with autocast("bf16", device):
                    out = module(x)
                out.float().square().mean().backward()
            return run

        dense_s = timed(step(dense), device, cfg["repeats"], cfg["warmup"])
        rows.append(dict(shape=name, backend="dense", ms=dense_s * 1e3, ratio_to_dense=1.0))
        for backend in backends:
            try:
                moe = MoELayer(d, MoEConfig(num_experts=s["num_experts"], top_k=s["top_k"], expert_hidden=s["expert_hidden"],
                                            capacity_factor=None, backend=backend)).to(device).train()
                moe.init_weights(0.02, 0.02)
                choice = moe.experts.choice(device, torch.bfloat16)
                rec = GemmDtypeRecorder()
                with rec:
                    step(moe)()
                sec = timed(step(moe), device, cfg["repeats"], cfg["warmup"])
                row = dict(shape=name, backend=backend, resolved=choice.backend, ms=sec * 1e3, ratio_to_dense=dense_s / sec,
                           gemm_operand_dtypes=rec.summary(),
                           master_grad_dtypes=sorted({str(p.grad.dtype) for p in moe.parameters() if p.grad is not None}))
                if backend == "auto":
                    row.update(target_ratio=targets.get(name), skipped=choice.skipped)
                rows.append(row)
            except Exception as err:  # noqa: BLE001
                rows.append(dict(shape=name, backend=backend, error=f"{type(err).__name__}: {err}"))
            _progress(f"b {name} {backend}: " + (f"{rows[-1]['ms']:.2f} ms" if "ms" in rows[-1] else rows[-1]["error"]))
    return {"results": rows, "note": "fp32 master weights and input, torch.autocast bf16, forward + backward; "
                                     "targets (issue 21, H200): >= 0.9x dense at coarse, >= 0.7x at fine"}


# --- c: the training step in-process -------------------------------------------------------------

class RandomTokensLM:
    """Next-token prediction on random token batches: cluster.tasks.lm.LanguageModeling's loss
    methods when that module imports (it needs pyarrow for its data reader), else a copy of the
    same four methods (a test checks they agree)."""

    def __init__(self):
        try:
            from cluster.tasks.lm import LanguageModeling
        except ImportError as err:
            self.source = f"in-memory copy of LanguageModeling's loss ({err})"
            self.impl = None
        else:
            self.source = "cluster.tasks.lm.LanguageModeling"
            self.impl = LanguageModeling.__new__(LanguageModeling)  # no dataset on disk

    def inputs_targets(self, batch, device):
        if self.impl is not None:
            return self.impl.inputs_targets(batch, device)
        tokens = torch.from_numpy(batch).to(device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:]

    def output_loss_sum(self, logits, targets):
        if self.impl is not None:
            return self.impl.output_loss_sum(logits, targets)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")

    def loss_sum(self, model, batch, device):
        inputs, targets = self.inputs_targets(batch, device)
        return self.output_loss_sum(model(inputs), targets), targets.numel()

    def num_targets(self, batch):
        return batch.shape[0] * (batch.shape[1] - 1)


def train_case(name: str, spec: dict, cfg: dict, device: torch.device) -> dict:
    import numpy as np

    import archs
    from cluster.config.job import load_config
    from cluster.train.optim import build_optimizer, build_scheduler
    from cluster.train.precision import DynamicLossScaler, kernel_report
    from cluster.train.step import train_step

    overrides = spec["overrides"] + [f"model.vocab_size={spec['vocab']}", "train.precision=bf16",
                                     f"train.global_batch_size={spec['batch']}", f"train.micro_batch_size={spec['micro']}",
                                     "cluster.num_workers=1", f"cluster.use_gpu={str(device.type == 'cuda').lower()}"]
    job = load_config(spec.get("config", "moe_small"), overrides)
    t, seq = job.train, job.data.seq_len
    torch.manual_seed(0)
    model = archs.build(job.model).to(device)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, t.betas)
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
    scaler = DynamicLossScaler(enabled=False)
    task = RandomTokensLM()
    layout = (job.model.moe_layer_ids, job.model.moe.num_experts)
    lines, record = kernel_report(model, "bf16", device)
    for line in lines:
        _progress(f"c {name}: {line}")
    rng = np.random.default_rng(0)
    steps, warm = cfg["train_steps"], cfg["train_warmup"]
    batches = [rng.integers(0, spec["vocab"], size=(spec["batch"], seq + 1), dtype=np.int64) for _ in range(2)]
    losses, times = [], []
    for i in range(warm + steps):
        gb = batches[i % 2]
        micro = [gb[j:j + spec["micro"]] for j in range(0, spec["batch"], spec["micro"])]
        _sync(device)
        t0 = time.perf_counter()
        r = train_step(model, task, micro, optimizer, scaler, "bf16", device, t.grad_clip, layout)
        scheduler.step()
        _sync(device)
        losses.append(r.loss)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = spec["batch"] * seq
    flops_tok = model.flops_per_token(seq)
    peak, peak_source = device_peak(device)
    out = dict(config=name, parameters=sum(p.numel() for p in model.parameters()), seq_len=seq,
               global_batch=spec["batch"], micro_batch=spec["micro"], steps_timed=steps, step_ms=step_s * 1e3,
               tokens_per_s=tokens / step_s, flops_per_token=flops_tok, model_tflops=tokens / step_s * flops_tok / 1e12,
               mfu=(tokens / step_s * flops_tok / peak) if peak else None, peak_source=peak_source,
               losses=losses, kernel=record, task=task.source)
    if torch.cuda.is_available() and device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    del model, optimizer
    return out


def part_train(cfg: dict, device: torch.device, tiny: bool) -> dict:
    rows = []
    for name, spec in (TINY_TRAIN if tiny else TRAIN_CONFIGS).items():
        try:
            rows.append(train_case(name, spec, cfg, device))
            _progress(f"c {name}: {rows[-1]['tokens_per_s']:.0f} tokens/s, MFU "
                      + (f"{100 * rows[-1]['mfu']:.1f}%" if rows[-1]["mfu"] else f"n/a ({rows[-1]['peak_source']})"))
        except Exception as err:  # noqa: BLE001
            rows.append(dict(config=name, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=4)))
            _progress(f"c {name}: {rows[-1]['error']}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return {"results": rows, "note": "train_step in this process, world size 1, bf16 autocast, AdamW; target "
                                     "(issue 21, H200): the 1 B MoE step at >= 35% MFU"}


# --- d: which SDPA kernel runs -------------------------------------------------------------------

SDPA_OPS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
            "_scaled_dot_product_efficient_attention": "memory-efficient", "_scaled_dot_product_cudnn_attention": "cudnn",
            "_scaled_dot_product_fused_attention_overrideable": "fused (overrideable)",
            "_scaled_dot_product_attention_math": "math"}


def sdpa_kernels(fn, device: torch.device) -> list[str]:
    """Names of the SDPA implementations `fn()` dispatched to (from the profiler's op names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        _sync(device)
    names = {ev.key.removeprefix("aten::") for ev in prof.key_averages()}
    return sorted(SDPA_OPS[n] for n in names if n in SDPA_OPS)


def part_attention(cfg: dict, device: torch.device) -> dict:
    import torch.nn.functional as F

    from archs.common import local_attention

    a = cfg["attention"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(a["batch"], a["heads"], a["seq"], a["head_dim"], device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    cases = {"dense causal (is_causal=True, no mask)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
             f"local window {a['window']} (blockwise, explicit bool mask)": lambda: local_attention(q, k, v, a["window"])}
    rows = []
    for label, fn in cases.items():
        def fwd_bwd(fn=fn):
            fn().float().sum().backward()
        kernels = sdpa_kernels(fwd_bwd, device)
        sec = timed(fwd_bwd, device, cfg["repeats"], cfg["warmup"])
        rows.append(dict(case=label, kernels=kernels, ms=sec * 1e3))
        _progress(f"d {label}: {kernels} {sec * 1e3:.2f} ms")
    return {"shape": a, "dtype": str(dtype), "results": rows,
            "note": "flash attention takes no arbitrary mask, so the window's explicit mask sends it to another kernel"}


# --- e: mamba_ssm vs the chunked scan ------------------------------------------------------------

def part_mamba(cfg: dict, device: torch.device) -> dict:
    from archs.mamba import mamba_ssm_unavailable_reason, scan_functions

    if device.type != "cuda":
        raise Skipped("mamba_ssm's Triton scan runs on CUDA only")
    reason = mamba_ssm_unavailable_reason()
    if reason is not None:
        raise Skipped(reason)
    m = cfg["mamba"]
    fns = scan_functions()
    g = torch.Generator(device=device).manual_seed(0)
    B, T, H, P, N = m["batch"], m["seq"], m["heads"], m["head_dim"], m["d_state"]
    x = torch.randn(B, T, H, P, device=device, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(B, T, H, device=device, generator=g) - 3)
    A = -torch.rand(H, device=device, generator=g) * 4 - 0.5
    Bm, Cm = (torch.randn(B, T, N, device=device, generator=g) for _ in range(2))
    y_ref, s_ref = fns["chunked"](x, dt, A, Bm, Cm, None, m["chunk"])
    y, s = fns["mamba_ssm"](x, dt, A, Bm, Cm, None, m["chunk"])
    rel = float((y.float() - y_ref).norm() / y_ref.norm())
    times = {name: timed(lambda f=fns[name]: f(x, dt, A, Bm, Cm, None, m["chunk"]), device, cfg["repeats"], cfg["warmup"]) * 1e3
             for name in ("chunked", "mamba_ssm")}
    return {"shape": m, "rel_error_y": rel, "max_abs_diff_state": float((s.float() - s_ref).abs().max()),
            "forward_ms": times}


# --- f: bitsandbytes NF4 -------------------------------------------------------------------------

def part_nf4(cfg: dict, device: torch.device, tiny: bool) -> dict:
    if device.type != "cuda":
        raise Skipped("bitsandbytes NF4 runs on CUDA only")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # noqa: BLE001
        raise Skipped(f"bitsandbytes does not import ({type(err).__name__}: {err})") from None
    import copy

    import archs
    from archs.sampling import generate
    from archs.transformer import PRESETS, TransformerConfig
    from cluster.deploy.quantize import quantize_nf4

    torch.manual_seed(0)
    cpu_model = archs.build(TransformerConfig(**PRESETS["debug" if tiny else "small"], vocab_size=256)).eval()
    q = quantize_nf4(copy.deepcopy(cpu_model))  # quantized as deployment does it: from CPU weights
    model = cpu_model.to(device)
    prompt = torch.randint(1, 256, (4, 16), device=device)
    with torch.no_grad():
        ref, got = model(prompt).float(), q(prompt).float()
    generate(q, prompt, 4, temperature=0)
    _sync(device)
    t0 = time.perf_counter()
    out = generate(q, prompt, 64, temperature=0)
    _sync(device)
    dt = time.perf_counter() - t0
    return {"logits_rel_error": float((got - ref).norm() / ref.norm()), "generated_tokens": int(out.shape[1] - 16) * 4,
            "tokens_per_s": (out.shape[1] - 16) * 4 / dt}


# --- driver ----------------------------------------------------------------------------------------

def _progress(msg: str) -> None:
    print(f"[bench gpu] {msg}", flush=True)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    for pkg in ("grouped_gemm", "mamba_ssm", "bitsandbytes", "triton"):
        with contextlib.suppress(Exception):
            env[pkg] = getattr(__import__(pkg), "__version__", "imports")
    return env


def run_check(out_dir: Path, device: torch.device, tiny: bool, parts: str) -> dict:
    cfg = TINY if tiny else FULL
    if tiny:  # blocksparse's 128-row blocks do not fit the tiny widths
        from kernels import blocksparse

        blocksparse.BLOCK_SIZE = 8
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check.json"
    result = {"environment": environment(device), "tiny": tiny, "parts": {},
              "not_checked": "expert parallelism over NCCL (needs two GPUs)"}
    runners = {"a": ("kernels", lambda: part_kernels(cfg, device)), "b": ("moe_layer_autocast", lambda: part_layer(cfg, device)),
               "c": ("train_step", lambda: part_train(cfg, device, tiny)), "d": ("sdpa", lambda: part_attention(cfg, device)),
               "e": ("mamba_ssm", lambda: part_mamba(cfg, device)), "f": ("nf4", lambda: part_nf4(cfg, device, tiny))}
    t_all = time.perf_counter()
    for letter in parts:
        name, fn = runners[letter]
        t0 = time.perf_counter()
        _progress(f"part {letter} ({name}) ...")
        try:
            entry = {"status": "ok", **fn()}
        except Skipped as why:
            entry = {"status": "skipped", "reason": str(why)}
        except Exception as err:  # noqa: BLE001 - one part failing must not lose the others
            entry = {"status": "failed", "reason": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=6)}
        entry["seconds"] = time.perf_counter() - t0
        result["parts"][f"{letter}_{name}"] = entry
        _progress(f"part {letter} ({name}): {entry['status']} in {entry['seconds']:.1f} s"
                  + (f": {entry['reason']}" if "reason" in entry else ""))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["seconds"] = time.perf_counter() - t_all
        path.write_text(json.dumps(result, indent=1, default=str))  # after every part: a timeout keeps the rest
    return result


def main(argv=None, from_cli: bool = False) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json")
    p.add_argument("--device", default="cuda", help="default: %(default)s (cpu runs the skeleton; use with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and 2 training steps (a smoke run, not figures)")
    p.add_argument("--parts", default=PARTS, help=f"which parts, e.g. 'abc' (default: {PARTS})")
    args = p.parse_args(argv)
    bad = set(args.parts) - set(PARTS)
    if bad:
        p.error(f"--parts: unknown part(s) {''.join(sorted(bad))}; valid: {PARTS}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu --tiny")
    result = run_check(args.out, device, args.tiny, args.parts)
    print(f"[bench gpu] wrote {args.out / 'gpu_check.json'} in {result['seconds']:.0f} s: "
          + ", ".join(f"{k} {v['status']}" for k, v in result["parts"].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
