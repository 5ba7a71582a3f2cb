"""Deployment benchmark: sizes, perplexity, ONNX Runtime latency, generation throughput.

  python -m jobs.bench deploy --out bench_results/deploy_cpu.json
  python -m jobs.bench deploy --dense-run runs/A --moe-run runs/B      # measure existing runs

For the `small` dense and MoE transformers: file size at fp32, bf16, int8 and int4 (torchao,
packed), validation perplexity of each (bf16: weights rounded to bf16, fp32 compute: this CPU has
no fast bf16 matmul), torch vs ONNX Runtime forward latency at 128 and 512 tokens (batch 1), and
cached greedy generation throughput at batch 1 and 16. Without a run given, each model is first
trained briefly in this process (no Ray: the same train_step the Ray loop runs) with
max_seq_len 512 so that 512-token latency can be measured (the data are 256-token sequences).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from cluster.train import malloc


def train_local(job, run_dir: str | Path, log_every: int = 25) -> Path:
    """Train `job` in this process, one rank, and save a checkpoint run directory as Ray would
    (config.yaml, tokenizer/, checkpoint_N/). For benchmarks and tests; returns the run dir."""
    from cluster import checkpoint
    from cluster.train.precision import DynamicLossScaler
    from cluster.config.job import dump_config
    from cluster.train.optim import build_optimizer, build_scheduler
    from cluster.train.step import train_step
    from cluster.tasks.registry import build_task
    from cluster.train.driver import _copy_tokenizer, prepare_data, resolve

    import archs

    prepare_data(job)
    job = resolve(job)
    t = job.train
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(job))
    _copy_tokenizer(job.data.path, run_dir)
    torch.manual_seed(t.seed)
    task = build_task(t.task, job.data, t)
    batches = task.train_batches(t.global_batch_size, t.micro_batch_size, 0, 1, t.seed)
    model = archs.build(job.model)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, t.betas)
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
    scaler = DynamicLossScaler(enabled=False)
    moe = getattr(job.model, "moe", None)
    layout = (job.model.moe_layer_ids, moe.num_experts) if moe is not None else None
    t0 = time.perf_counter()
    for step in range(t.steps):
        r = train_step(model, task, batches.batches_for_step(step * t.global_batch_size), optimizer, scaler,
                       t.precision, torch.device("cpu"), t.grad_clip, layout)
        scheduler.step()
        if (step + 1) % log_every == 0 or step + 1 == t.steps:
            print(f"[bench deploy] train {job.model.arch} step {step + 1}/{t.steps} loss {r.loss:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    state = {"step": t.steps, "samples": t.steps * t.global_batch_size, "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict()}
    checkpoint.save(run_dir / checkpoint.dir_name(t.steps), model, optimizer, state, job.model, 0, 1)
    return run_dir


def bench_model(run_dir: Path, out_dir: Path, eval_sequences: int, seq_lens: list[int], gen_tokens: int) -> dict:
    from cluster.deploy import serving as deploy
    from cluster.deploy import quantize as q
    from cluster.deploy.load import load_run

    model, _, ckpt = load_run(run_dir)
    name = model.cfg.arch
    out = out_dir / name
    out.mkdir(parents=True, exist_ok=True)
    batches = deploy.validation_batches(run_dir, eval_sequences)
    base = deploy.inference_copy(model, dense=False)
    row: dict = {"arch": name, "run": str(run_dir), "checkpoint": str(ckpt),
                 "parameters": sum(p.numel() for p in model.parameters()), "size_bytes": {}, "val_ppl": {}}
    row["size_bytes"]["fp32"] = q.save_float(base, out / "fp32.safetensors", torch.float32).stat().st_size
    row["size_bytes"]["bf16"] = q.save_float(base, out / "bf16.safetensors", torch.bfloat16).stat().st_size
    row["val_ppl"]["fp32"] = math.exp(deploy.eval_loss(model, batches))
    row["val_ppl"]["bf16"] = math.exp(deploy.eval_loss(q.round_to(copy.deepcopy(model), torch.bfloat16), batches))
    quantized = {}
    for mode in ("int8", "int4"):
        qm = copy.deepcopy(model)
        q.quantize(qm, mode)
        path = q.save_quantized(qm, out / f"{mode}.safetensors", model.cfg)
        quantized[mode] = q.load_quantized(path)
        row["size_bytes"][mode] = path.stat().st_size
        row["val_ppl"][mode] = math.exp(deploy.eval_loss(quantized[mode], batches))
        print(f"[bench deploy] {name} {mode}: {path.stat().st_size / 2**20:.2f} MB, ppl {row['val_ppl'][mode]:.4f}", flush=True)
    row["ratio_vs_fp32"] = {k: row["size_bytes"]["fp32"] / v for k, v in row["size_bytes"].items()}
    row["ppl_increase_pct"] = {k: 100 * (v / row["val_ppl"]["fp32"] - 1) for k, v in row["val_ppl"].items()}
    onnx_path = deploy.export_onnx(model, out / "model.onnx")
    session = deploy.ort_session(onnx_path, torch.get_num_threads())
    check = [torch.from_numpy(b[:, :-1]).long() for b in batches[:2]]
    row["onnx_max_abs_diff"] = deploy.onnx_parity(session, model, check)
    row["latency"] = deploy.latency(model, session, [T for T in seq_lens if T <= model.cfg.max_seq_len])
    print(f"[bench deploy] {name} ONNX: max |diff| {row['onnx_max_abs_diff']:.1e}; latency {row['latency']}", flush=True)
    row["generation"] = {}
    for label, m in (("fp32", base), ("int8", quantized["int8"]), ("int4", quantized["int4"])):
        row["generation"][label] = [deploy.generation_throughput(m, b, 16, gen_tokens) for b in (1, 16)]
        print(f"[bench deploy] {name} generation {label}: "
              + ", ".join(f"batch {g['batch']} {g['tokens_per_s']:.0f} tokens/s" for g in row["generation"][label]),
              flush=True)
    return row


def main(argv=None, from_cli: bool = False) -> int:
    if from_cli:
        malloc.reexec_with_caching_malloc("jobs.bench")
    p = argparse.ArgumentParser(prog="python -m jobs.bench deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results/deploy_cpu.json", help="JSON results (default: %(default)s)")
    p.add_argument("--work-dir", default="bench_results/deploy_work", help="trained runs and exported files")
    p.add_argument("--dense-run", default=None, help="an existing run of a dense model (skips its training)")
    p.add_argument("--moe-run", default=None, help="an existing run of an MoE model (skips its training)")
    p.add_argument("--train-steps", type=int, default=60, help="steps of the brief in-process training")
    p.add_argument("--eval-sequences", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from cluster.config.job import load_config

    work = Path(args.work_dir)
    runs = {}
    for key, config, given in (("dense", "default", args.dense_run), ("moe", "moe_small", args.moe_run)):
        if given:
            runs[key] = Path(given)
            continue
        run_dir = work / f"run-{key}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        job = load_config(config, [f"train.steps={args.train_steps}", "train.warmup_steps=10",
                                   "train.micro_batch_size=16", "cluster.num_workers=1",
                                   "model.max_seq_len=512"])
        runs[key] = train_local(job, run_dir)
    t0 = time.perf_counter()
    rows = [bench_model(runs[k], work, args.eval_sequences, [128, 512], args.gen_tokens) for k in ("dense", "moe")]
    result = {"bench": "deploy", "threads": args.threads, "train_steps": args.train_steps,
              "torch": torch.__version__, "wall_s": time.perf_counter() - t0, "models": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(rows)
    print(f"[bench deploy] wrote {args.out}")
    return 0


def print_table(rows: list[dict]) -> None:
    print("\n| model | params | fp32 MB | bf16 MB | int8 MB | int4 MB | int4 x smaller | ppl fp32 | bf16 | int8 | int4 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, ppl = r["size_bytes"], r["val_ppl"]
        print(f"| {r['arch']} | {r['parameters'] / 1e6:.2f} M | " + " | ".join(f"{s[k] / 2**20:.2f}" for k in ("fp32", "bf16", "int8", "int4"))
              + f" | {r['ratio_vs_fp32']['int4']:.2f}x | " + " | ".join(f"{ppl[k]:.3f}" for k in ("fp32", "bf16", "int8", "int4")) + " |")
    print("\n| model | T | torch ms | ORT ms | gen fp32 b1 / b16 tok/s | int8 b1 / b16 | int4 b1 / b16 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        g = r["generation"]
        gen = " | ".join(f"{g[k][0]['tokens_per_s']:.0f} / {g[k][1]['tokens_per_s']:.0f}" for k in ("fp32", "int8", "int4"))
        for lat in r["latency"]:
            print(f"| {r['arch']} | {lat['seq_len']} | {lat['torch_ms']:.1f} | {lat['ort_ms']:.1f} | {gen} |")


if __name__ == "__main__":
    sys.exit(main())
