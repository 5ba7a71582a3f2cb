"""Sample text from the latest checkpoint of a run, on one process, with a KV cache.

  python -m jobs.generate runs/NAME --prompt "The import statement" --max-new-tokens 200
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import archs
from archs.sampling import generate
from cluster import checkpoint
from cluster.config import model_from_dict
from cluster.tokenizer import load_tokenizer


def load_run(run_dir: str | Path, step: int | None = None):
    """(model, tokenizer, checkpoint path) of a run's latest complete checkpoint (or `step`'s)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if step is None:
        ckpt = checkpoint.latest_complete(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint yet ({checkpoint.PREFIX}* with meta.json)")
    else:
        ckpt = run_dir / checkpoint.dir_name(step)
    meta = checkpoint.read_meta(ckpt)
    model_cfg = model_from_dict(meta["model"])
    model = archs.build(model_cfg)
    checkpoint.load_model_weights(ckpt, model, model_cfg)
    return model.eval(), load_tokenizer(run_dir / "tokenizer"), ckpt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (runs/NAME)")
    p.add_argument("--prompt", default="The ", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--step", type=int, default=None, help="load this step's checkpoint instead of the latest")
    args = p.parse_args(argv)
    try:
        model, tok, ckpt = load_run(args.run_dir, args.step)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = tok.encode(args.prompt)
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
    for row in out.tolist():
        print(tok.decode(row))
        print("-" * 40)
    new = (out.shape[1] - len(ids)) * args.num_samples
    print(f"# {new} tokens in {dt:.2f} s ({new / dt:.0f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
