"""Train a model on Ray Train.

  python -m jobs.train                                   # default: small transformer, 2 CPU workers
  python -m jobs.train --config debug --set train.steps=20 --set cluster.run_name=try1
  ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.train --config ...

An existing run name resumes that run from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import sys

from cluster.config.job import dump_config, load_config
from cluster.config.typed import ConfigError, describe


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default",
                   help="YAML file, or the name of one in jobs/configs/ (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.steps=50")
    p.add_argument("--name", help="run name (same as --set cluster.run_name=NAME); an existing run resumes")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type, default and help (model.*: the family of --config)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.help_config:
        from cluster.config.job import JobConfig
        try:  # the model section's keys are its family's: the family of --config (and --set model.arch)
            model = load_config(args.config, args.overrides).model
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        print("\n".join(line for line in describe(JobConfig) if not line.startswith("model:")))
        print(f"# model.*: the fields of the {model.arch!r} family (from --config {args.config}; "
              "another family: --config NAME or --set model.arch=NAME)")
        print("\n".join(describe(type(model), "model.")))
        return 0
    overrides = args.overrides + ([f"cluster.run_name={args.name}"] if args.name else [])
    try:
        job = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(job), end="")
        return 0

    from cluster.train.driver import fit  # Ray is imported only when training

    try:
        summary = fit(job)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    print("\n[raymoe] run finished")
    print(f"  run dir          {s['run_dir']}")
    print(f"  steps            {s['steps']}")
    print(f"  train loss       {f(s['final_train_loss'], '.4f')}")
    if s.get("final_aux_loss") is not None:
        print(f"  MoE aux loss     {f(s['final_aux_loss'], '.4f')}")
    print(f"  val loss         {f(s['first_val_loss'], '.4f')} -> {f(s['last_val_loss'], '.4f')}"
          f"  (ppl {f(s['last_val_ppl'], '.2f')})")
    task_metrics = {k: v for k, v in s.get("last_eval", {}).items() if k not in ("val_loss", "val_ppl")}
    if task_metrics:
        print("  task metrics     " + "   ".join(f"{k} {v:.4f}" for k, v in task_metrics.items()))
    print(f"  throughput       {f(s['tokens_per_s'], ',.0f')} tokens/s on {s['world_size']} workers")
    print(f"  wall time        {s['wall_s']:.1f} s")
    print(f"  summary          {s['run_dir']}/summary.json")


if __name__ == "__main__":
    sys.exit(main())
