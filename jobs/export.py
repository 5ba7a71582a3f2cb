"""Export a run's latest checkpoint for serving: ONNX (ONNX Runtime), int8/int4 weight-only, or the
Hugging Face layout of its family.

  python -m jobs.export runs/NAME --format onnx                 # model.onnx, parity and latency vs torch
  python -m jobs.export runs/NAME --format hf --out DIR         # safetensors (sharded + index), config.json, tokenizer
  python -m jobs.export runs/NAME --quantize int4               # packed int4 safetensors, size/ppl/latency
  python -m jobs.export runs/NAME --quantize int8 --out deploy/ --eval-sequences 64

Loads the newest complete checkpoint on one process whatever layout wrote it; files and a
summary JSON go to --out (default RUN_DIR/export/). A model larger than memory: see
`python -m jobs.generate --max-memory-mb` (accelerate, disk offload).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (runs/NAME) or its URI (s3://bucket/runs/NAME)")
    p.add_argument("--format", choices=("onnx", "hf"), default=None,
                   help="onnx: an ONNX model of the forward pass; hf: the Hugging Face layout (what save_pretrained "
                        "writes: per-expert tensors) of an imported run's family, every expert gathered")
    p.add_argument("--max-shard-mb", type=float, default=5000, help="hf: largest safetensors file (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="hf: float32, bfloat16 or float16 (default: the imported checkpoint's)")
    p.add_argument("--hf-family", default=None, help="hf: the layout for a run not imported from Hugging Face "
                   "(llama for a transformer, mixtral/qwen3_moe/... for an MoE transformer)")
    p.add_argument("--quantize", choices=("int8", "int4", "nf4"), default=None,
                   help="weight-only quantization (int8/int4: torchao on CPU; nf4: bitsandbytes, CUDA only)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size along the input (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export; ./export/NAME for a URI)")
    p.add_argument("--step", type=int, default=None, help="export this step's checkpoint instead of the latest")
    p.add_argument("--config", default=None, help="model config (YAML or jobs/configs name) the checkpoint must match")
    p.add_argument("--eval-sequences", type=int, default=32, help="validation sequences for the loss comparison")
    p.add_argument("--seq-lens", default=None, help="comma-separated lengths for latency (default: 32,128,max)")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens generated for the latency figure")
    p.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads (default: torch's)")
    args = p.parse_args(argv)
    if (args.format is None) == (args.quantize is None):
        p.error("give exactly one of --format onnx or --quantize int8|int4|nf4")
    return args


def progress(msg: str) -> None:
    print(f"[export] {msg}", flush=True)


def load(args):
    from cluster.deploy.load import load_run

    expect = None
    if args.config:
        from cluster.config.job import load_config
        from cluster.train.driver import resolve

        expect = resolve(load_config(args.config)).model  # vocab from its data, as in training
    model, _, ckpt = load_run(args.run_dir, args.step, model_cfg=expect)
    # A run in a bucket exports to a local directory named after it (the files are for serving).
    default = Path("export") / args.run_dir.rstrip("/").rsplit("/", 1)[-1] if "://" in args.run_dir else \
        Path(args.run_dir) / "export"
    out = Path(args.out or default)
    out.mkdir(parents=True, exist_ok=True)
    progress(f"loaded {ckpt} ({model.cfg.arch}, {sum(p.numel() for p in model.parameters()):,} parameters)")
    return model, ckpt, out


def batches_for(run_dir, n: int) -> list:
    from cluster.deploy.serving import validation_batches

    return validation_batches(run_dir, n)


def run_onnx(args, model, ckpt, out: Path) -> dict:
    from cluster.deploy import serving as deploy

    deploy.check_exportable(model.cfg)
    t0 = time.perf_counter()
    progress("exporting to ONNX (dynamic batch and sequence) ...")
    path = deploy.export_onnx(model, out / "model.onnx")
    progress(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MB) in {time.perf_counter() - t0:.1f} s")
    session = deploy.ort_session(path, args.threads)
    held_out = [torch.from_numpy(b[:, :-1]).long() for b in batches_for(args.run_dir, args.eval_sequences)]
    # Several batch sizes and lengths, so one trace-specialised shape could not pass unnoticed.
    checks = [b[:, : max(1, b.shape[1] // (1 + i % 3))] for i, b in enumerate(held_out[:4])]
    err = deploy.onnx_parity(session, model, checks)
    progress(f"ONNX Runtime vs torch on {len(checks)} held-out batches: max |diff| {err:.2e}")
    lens = [int(x) for x in args.seq_lens.split(",")] if args.seq_lens else sorted({32, 128, model.cfg.max_seq_len})
    lens = [T for T in lens if T <= model.cfg.max_seq_len]
    lat = deploy.latency(model, session, lens)
    for r in lat:
        progress(f"  T={r['seq_len']:>4}: torch {r['torch_ms']:.2f} ms, ONNX Runtime {r['ort_ms']:.2f} ms")
    return {"format": "onnx", "file": str(path), "bytes": path.stat().st_size, "max_abs_diff": err,
            "parity_batches": [list(b.shape) for b in checks], "latency": lat}


def run_quantize(args, model, ckpt, out: Path) -> dict:
    from cluster.deploy import serving as deploy
    from cluster.deploy import quantize as q

    if args.quantize == "nf4":
        q.quantize_nf4(model)  # raises on CPU with the reason
        return {"format": "nf4", "device": "cuda"}
    base = deploy.inference_copy(model, dense=False)
    sizes = {"fp32": q.save_float(base, out / "model-fp32.safetensors", torch.float32).stat().st_size,
             "bf16": q.save_float(base, out / "model-bf16.safetensors", torch.bfloat16).stat().st_size}
    progress(f"quantizing to {args.quantize} (torchao, weight-only{', group ' + str(args.group_size) if args.quantize == 'int4' else ''}) ...")
    qmodel = copy.deepcopy(model)
    info = q.quantize(qmodel, args.quantize, args.group_size)
    path = q.save_quantized(qmodel, out / f"model-{args.quantize}.safetensors", model.cfg)
    sizes[args.quantize] = path.stat().st_size
    reloaded = q.load_quantized(path)
    probe = torch.randint(0, model.cfg.vocab_size, (2, min(32, model.cfg.max_seq_len)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reload_diff = float((reloaded(probe) - qmodel(probe)).abs().max())
    progress(f"saved {path} ({sizes[args.quantize] / 2**20:.2f} MB; fp32 {sizes['fp32'] / 2**20:.2f} MB, "
             f"bf16 {sizes['bf16'] / 2**20:.2f} MB); reloaded max |diff| {reload_diff:.1e}")
    batches = batches_for(args.run_dir, args.eval_sequences)
    loss_fp32 = deploy.eval_loss(model, batches)
    loss_q = deploy.eval_loss(reloaded, batches)
    progress(f"validation loss fp32 {loss_fp32:.4f} (ppl {math.exp(loss_fp32):.3f}), {args.quantize} {loss_q:.4f} "
             f"(ppl {math.exp(loss_q):.3f}, {100 * (math.exp(loss_q - loss_fp32) - 1):+.2f}%)")
    gen = {name: deploy.generation_throughput(m, 1, 8, min(args.gen_tokens, model.cfg.max_seq_len - 8))
           for name, m in (("fp32", base), (args.quantize, reloaded))}
    progress(f"generation (batch 1): fp32 {gen['fp32']['tokens_per_s']:.0f} tokens/s, "
             f"{args.quantize} {gen[args.quantize]['tokens_per_s']:.0f} tokens/s")
    return {"format": args.quantize, "file": str(path), "quantization": info, "bytes": sizes,
            "ratio_vs_fp32": sizes["fp32"] / sizes[args.quantize], "ratio_vs_bf16": sizes["bf16"] / sizes[args.quantize],
            "reload_max_abs_diff": reload_diff, "eval_sequences": sum(len(b) for b in batches),
            "val_loss": {"fp32": loss_fp32, args.quantize: loss_q},
            "val_ppl": {"fp32": math.exp(loss_fp32), args.quantize: math.exp(loss_q)},
            "ppl_increase_pct": 100 * (math.exp(loss_q - loss_fp32) - 1), "generation": gen}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from cluster import checkpoint
    from cluster.deploy import serving as deploy
    from cluster.config.typed import ConfigError

    t0 = time.perf_counter()
    if args.format == "hf":
        from cluster.deploy.hf import HFConfigError, export_hf

        try:
            summary = export_hf(args.run_dir, args.out or Path(args.run_dir) / "export" / "hf", args.step,
                                int(args.max_shard_mb * 2**20), args.dtype, args.hf_family, progress)
        except (FileNotFoundError, ValueError, HFConfigError, checkpoint.CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        path = deploy.write_summary(Path(summary["out"]), {"run_dir": str(args.run_dir), **summary}, "summary-hf.json")
        progress(f"done in {time.perf_counter() - t0:.1f} s; summary {path}")
        return 0
    try:
        model, ckpt, out = load(args)
        result = run_onnx(args, model, ckpt, out) if args.format else run_quantize(args, model, ckpt, out)
    except (FileNotFoundError, ValueError, ConfigError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"run_dir": str(args.run_dir), "checkpoint": str(ckpt), "arch": model.cfg.arch,
               "parameters": sum(p.numel() for p in model.parameters()), **result,
               "wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    name = f"summary-{result['format']}.json"
    path = deploy.write_summary(out, summary, name)
    progress(f"done in {summary['wall_s']:.1f} s; summary {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
