"""Import a Hugging Face checkpoint (Llama, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) as a raymoe run.

  python -m jobs.import_hf path/to/hf_model --name mymoe            # runs/mymoe, ready to train
  python -m jobs.train --config runs/mymoe/config.yaml --name mymoe --set parallel.ep=2
  python -m jobs.generate runs/mymoe --prompt "def main():" --temperature 0
  python -m jobs.export runs/mymoe --format hf --out mymoe-hf

HF_DIR holds config.json, model.safetensors (or model-*.safetensors + model.safetensors.index.json),
and optionally tokenizer.json, tokenizer_config.json, generation_config.json. Weights stream one
tensor at a time (positioned reads of the safetensors files) into a weights-only checkpoint (step 0). Every
config field is honoured or refused by name (cluster/deploy/hf/families.py). With a tokenizer,
the built-in pydoc corpus is tokenized into RUN_DIR/data for training (--data none: skip).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.import_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="a Hugging Face model directory")
    p.add_argument("--name", required=True, help="run name: writes STORAGE/NAME")
    p.add_argument("--storage", default="runs", help="where runs live (cluster.storage_path; default: %(default)s)")
    p.add_argument("--balance", choices=("aux", "bias"), default="aux",
                   help="aux: the checkpoint's router_aux_loss_coef (default); bias: auxiliary-loss-free bias "
                        "balancing at --bias-update-rate instead (the export then refuses, the families have no bias)")
    p.add_argument("--bias-update-rate", type=float, default=1e-3)
    p.add_argument("--data", default="pydoc", help="corpus tokenized into RUN_DIR/data for training (pydoc, text "
                   "files, a directory) or 'none' (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: min(256, max positions))")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cluster.config.job import dump_config, job_from_dict
    from cluster.config.typed import ConfigError
    from cluster.deploy.hf import HFConfigError, import_hf

    run_dir = Path(args.storage) / args.name
    overrides = {}
    if args.balance == "bias":
        overrides = {"moe": {"aux_loss_coeff": 0.0, "bias_update_rate": args.bias_update_rate}}
    try:
        summary = import_hf(args.hf_dir, run_dir, progress=lambda m: print(f"[import_hf] {m}", flush=True),
                            overrides=overrides)
        model = summary["model"]
        seq_len = args.seq_len or min(256, model["max_seq_len"])
        data = {"path": str((run_dir / "data").resolve()), "builtin": None, "seq_len": seq_len}
        if args.data != "none" and summary["tokenizer_vocab"]:
            from cluster.data.prepare import prepare

            meta = prepare(args.data, run_dir / "data", tokenizer=str(run_dir / "tokenizer"), seq_len=seq_len)
            print(f"[import_hf] tokenized {args.data}: {meta.num_train} train / {meta.num_val} val sequences of "
                  f"{seq_len} tokens in {run_dir / 'data'}", flush=True)
        job = job_from_dict({"model": model, "data": data,
                             "cluster": {"run_name": args.name, "storage_path": str(Path(args.storage).resolve())}})
        (run_dir / "config.yaml").write_text(dump_config(job))
    except (FileNotFoundError, FileExistsError, ValueError, HFConfigError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n[raymoe] imported {summary['model_type']} as {summary['arch']}")
    print(f"  run dir     {run_dir}")
    print(f"  checkpoint  {summary['checkpoint']} ({summary['tensors']} tensors, "
          f"{summary['bytes_on_disk'] / 2**20:.1f} MB on disk, {summary['wall_s']:.1f} s)")
    print(f"  tokenizer   {summary['tokenizer_vocab'] or 'none'}")
    print(f"  train with  python -m jobs.train --config {run_dir}/config.yaml --name {args.name}")
    (run_dir / "import_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
