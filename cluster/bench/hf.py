"""Hugging Face import/export and training speed against transformers.

  python -m jobs.bench hf                      # Qwen3-MoE-like, 8 layers of width 512 (~460 MB fp32)
  python -m jobs.bench hf --layers 2 --steps 2 --out bench_results/hf_quick.json

1. A random model directory in the hub layout is written (sharded safetensors, no transformers
   needed), then imported and exported, each in a fresh process with glibc's default malloc
   (cluster/train/malloc.py off): seconds and peak resident memory above the process's baseline
   (VmHWM after /proc/self/clear_refs), against the bytes on disk.
2. Training tokens/s of the imported model in raymoe (its grouped-GEMM MoE layer, balancing loss on)
   and in transformers (the same weights, its fastest experts implementation here, a plain
   AdamW loop), one process, 2 threads, the same batches, alternating so that load on the machine
   falls on both.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def bench_config(layers: int, width: int, experts: int, top_k: int, expert_hidden: int, vocab: int) -> dict:
    """A Qwen3-MoE config.json (transformers 5 field names)."""
    heads = width // 64
    return {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": vocab,
            "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2), "head_dim": 64,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "hidden_act": "silu",
            "num_local_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": expert_hidden,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 1e-3,
            "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_sliding_window": False,
            "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32"}


def write_random_hub_dir(config: dict, out: Path, shard_bytes: int = 200 * 2**20, seed: int = 0) -> int:
    """Random weights under the family's hub names, written shard by shard with an index; returns bytes."""
    from safetensors.torch import save_file

    import archs
    from cluster.config.job import model_from_dict
    from cluster.deploy.hf.convert import tensor_plan, to_hub
    from cluster.deploy.hf.families import family_of, to_raymoe_config

    out.mkdir(parents=True, exist_ok=True)
    cfg = model_from_dict(to_raymoe_config(config))
    with torch.device("meta"):
        sd = archs.build(cfg).state_dict()
    g = torch.Generator().manual_seed(seed)
    shards, shard, size = [], {}, 0

    def flush():
        nonlocal shard, size
        path = out / f"part-{len(shards)}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        shards.append((path, list(shard), size))
        shard, size = {}, 0

    for t in tensor_plan(cfg, family_of(config, "bench").names):
        if t.kind == "same":
            meta = sd[t.ours]
        else:
            stacked, e = t.ours.rsplit(".expert", 1)
            meta = sd[stacked][int(e)]
        for name, part in zip(t.theirs, to_hub(t, meta)):
            x = (torch.randn(part.shape, generator=g) / math.sqrt(part.shape[-1])) if part.dim() > 1 else torch.ones(part.shape)
            if shard and size + x.numel() * 4 > shard_bytes:
                flush()
            shard[name] = x
            size += x.numel() * 4
    flush()
    weight_map, total = {}, 0
    for i, (path, keys, nbytes) in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        path.rename(out / name)
        weight_map.update({k: name for k in keys})
        total += nbytes
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return total


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(kind: str, src: str, dst: str) -> dict:
    """In a fresh process: run the import or export once; seconds and peak RSS above the baseline.

    The baseline is taken after the same conversion ran once on a tiny model, so that it holds
    the libraries, thread pools and lazily imported modules (about 30 MB): the figure is what the
    model itself costs.
    """
    import tempfile

    from cluster.deploy.hf import export_hf, import_hf

    with tempfile.TemporaryDirectory() as tmp:
        write_random_hub_dir(bench_config(1, 64, 4, 2, 32, 64), Path(tmp) / "src")
        import_hf(Path(tmp) / "src", Path(tmp) / "run", progress=lambda m: None)
        export_hf(Path(tmp) / "run", Path(tmp) / "export", progress=lambda m: None)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if kind == "import":
        import_hf(src, dst, progress=lambda m: None)
    else:
        export_hf(src, dst, progress=lambda m: None)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "peak_rss_above_baseline_bytes": (_status_kb("VmHWM") - base) * 1024,
            "baseline_rss_bytes": base * 1024}


def measure(kind: str, src: Path, dst: Path) -> dict:
    """`child` in a new interpreter with glibc's default malloc (freed blocks go back: a true peak)."""
    from cluster.train.malloc import CACHING_MALLOC_ENV

    env = {k: v for k, v in os.environ.items() if k not in CACHING_MALLOC_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "cluster.bench.hf", "--child", kind, str(src), str(dst)],
                          env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_speed(src: Path, run: Path, steps: int, batch: int, seq_len: int, threads: int) -> dict:
    """raymoe vs transformers training tokens/s on the same batches, alternating steps."""
    from cluster.deploy.transformers_compat import import_transformers

    transformers = import_transformers()

    from cluster.deploy.load import load_run

    torch.set_num_threads(threads)
    ours, _, _ = load_run(run, tokenizer=False)
    ours.train()
    vocab = ours.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq_len + 1), generator=g) for _ in range(steps + 1)]

    def ours_step(x):
        logits = ours(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()  # the MoE balancing loss joins through the layer's attached gradient
        return loss

    impls, results = [], {}
    for impl in ("grouped_mm", "batched_mm", "eager"):
        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(src), experts_implementation=impl,
                                                                   dtype=torch.float32).train()
        except Exception as e:  # an implementation this torch/CPU lacks: skipped, and said so
            results[impl] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
            continue
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
        try:
            t0 = time.perf_counter()
            out = hf(batches[0][:, :-1], labels=batches[0][:, :-1])
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            results[impl] = time.perf_counter() - t0
            impls.append((results[impl], impl, hf, opt))
        except Exception as e:
            results[impl] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    if not impls:
        raise RuntimeError(f"no transformers experts implementation ran here: {results}")
    impls.sort(key=lambda r: r[0])
    _, best, hf, hf_opt = impls[0]
    for _, _, m, _ in impls[1:]:
        del m
    our_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    ours_step(batches[0])  # warm-up
    our_opt.step()
    our_opt.zero_grad()
    t_ours = t_hf = 0.0
    for x in batches[1:]:
        t0 = time.perf_counter()
        ours_step(x)
        our_opt.step()
        our_opt.zero_grad()
        t_ours += time.perf_counter() - t0
        t0 = time.perf_counter()
        # transformers' causal-LM loss shifts labels itself: labels = the inputs
        out = hf(x[:, :-1], labels=x[:, :-1])
        out.loss.backward()
        hf_opt.step()
        hf_opt.zero_grad()
        t_hf += time.perf_counter() - t0
    tokens = steps * batch * seq_len
    return {"threads": threads, "steps": steps, "batch": batch, "seq_len": seq_len,
            "raymoe_tokens_per_s": tokens / t_ours, "transformers_tokens_per_s": tokens / t_hf,
            "speedup": t_hf / t_ours, "transformers_experts_implementation": best,
            "transformers_first_step_s": results}


def main(argv=None, from_cli: bool = False) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-hidden", type=int, default=384)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=4, help="timed training steps per implementation")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("bench_results/hf_work"))
    p.add_argument("--out", type=Path, default=Path("bench_results/hf.json"))
    args = p.parse_args(argv)
    import shutil

    shutil.rmtree(args.workdir, ignore_errors=True)
    src, run, exp = args.workdir / "src", args.workdir / "run", args.workdir / "export"
    config = bench_config(args.layers, args.width, args.experts, args.top_k, args.expert_hidden, args.vocab)
    print(f"[bench hf] writing a random Qwen3-MoE directory ({args.layers} layers, width {args.width}, "
          f"{args.experts} experts top-{args.top_k}) ...", flush=True)
    disk = write_random_hub_dir(config, src)
    print(f"[bench hf] {disk / 2**20:.0f} MB on disk; importing in a fresh process ...", flush=True)
    imp = measure("import", src, run)
    print(f"[bench hf] import {imp['wall_s']:.1f} s, peak {imp['peak_rss_above_baseline_bytes'] / 2**20:.0f} MB "
          f"above baseline ({imp['peak_rss_above_baseline_bytes'] / disk:.2f}x the bytes on disk); exporting ...", flush=True)
    ex = measure("export", run, exp)
    print(f"[bench hf] export {ex['wall_s']:.1f} s, peak {ex['peak_rss_above_baseline_bytes'] / 2**20:.0f} MB "
          f"({ex['peak_rss_above_baseline_bytes'] / disk:.2f}x); training speed ({args.threads} threads) ...", flush=True)
    speed = train_speed(exp, run, args.steps, args.batch, args.seq_len, args.threads)
    print(f"\n{'':28s} {'seconds':>8s} {'peak MB':>8s} {'x disk':>7s}")
    for name, r in (("import", imp), ("export", ex)):
        print(f"{name:28s} {r['wall_s']:8.1f} {r['peak_rss_above_baseline_bytes'] / 2**20:8.0f} "
              f"{r['peak_rss_above_baseline_bytes'] / disk:7.2f}")
    print(f"\ntraining, {args.threads} threads, batch {args.batch} x {args.seq_len}:")
    print(f"  raymoe        {speed['raymoe_tokens_per_s']:10.0f} tokens/s")
    print(f"  transformers  {speed['transformers_tokens_per_s']:10.0f} tokens/s "
          f"(experts_implementation={speed['transformers_experts_implementation']})")
    print(f"  raymoe / transformers: {speed['speedup']:.2f}x (target >= 1.3x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": config, "bytes_on_disk": disk, "import": imp, "export": ex,
                                    "training": speed, "torch": torch.__version__}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(*sys.argv[2:5])))
        sys.exit(0)
    sys.exit(main())
