"""Sample text from the latest checkpoint of a run, on one process, with a KV cache.

  python -m jobs.generate runs/NAME --prompt "The import statement" --max-new-tokens 200
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from archs.sampling import generate
from cluster import checkpoint
from cluster.data.storage import StorageError
from cluster.deploy.load import load_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (runs/NAME) or its URI (s3://bucket/runs/NAME)")
    p.add_argument("--prompt", default="The ", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--step", type=int, default=None, help="load this step's checkpoint instead of the latest")
    p.add_argument("--max-memory-mb", type=float, default=None,
                   help="keep at most this many MB of weights in memory; the other blocks are offloaded to disk "
                        "(accelerate) and loaded for their own forward only: a model larger than memory")
    p.add_argument("--offload-dir", default=None, help="where offloaded weights go (default: RUN_DIR/offload)")
    args = p.parse_args(argv)
    try:
        offload = {}
        if args.max_memory_mb is not None:
            offload = dict(max_memory_bytes=int(args.max_memory_mb * 2**20),
                           offload_dir=args.offload_dir or (Path(tempfile.mkdtemp(prefix="raymoe-offload-"))
                                                            if "://" in args.run_dir else Path(args.run_dir) / "offload"))
        model, tok, ckpt = load_run(args.run_dir, args.step, **offload)
    except (FileNotFoundError, ValueError, checkpoint.CheckpointError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # An imported Hugging Face tokenizer adds what its model expects before a prompt (bos).
    ids = tok.encode_prompt(args.prompt) if hasattr(tok, "encode_prompt") else tok.encode(args.prompt)
    if not ids:
        print("error: --prompt is empty after tokenization", file=sys.stderr)
        return 2
    max_new = min(args.max_new_tokens, model.cfg.max_seq_len - len(ids))
    if max_new < 1:
        print(f"error: the prompt has {len(ids)} tokens, the model's limit is {model.cfg.max_seq_len}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.tensor([ids] * args.num_samples)
    t0 = time.perf_counter()
    out = generate(model, prompt, max_new, args.temperature, args.top_k, args.top_p, gen, eos_id=tok.eos_id)
    dt = time.perf_counter() - t0
    print(f"# {ckpt}", file=sys.stderr)
    if args.max_memory_mb is not None:
        from cluster.deploy.serving import resident_bytes

        disk = [name for name, where in model.device_map.items() if where == "disk"]
        print(f"# {resident_bytes(model) / 2**20:.2f} MB of weights resident (budget {args.max_memory_mb} MB); "
              f"offloaded to disk: {', '.join(disk) or 'nothing'}", file=sys.stderr)
    for row in out.tolist():
        print(tok.decode(row))
        print("-" * 40)
    new = (out.shape[1] - len(ids)) * args.num_samples
    print(f"# {new} tokens in {dt:.2f} s ({new / dt:.0f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
