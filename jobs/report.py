"""Plots of a run from its RUN_DIR/metrics.jsonl: losses, expert load per MoE layer, balance.

  python -m jobs.report runs/NAME            # writes runs/NAME/plots/*.png and prints their paths
"""
from __future__ import annotations

import argparse
import sys

from cluster.train.report import report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (runs/NAME)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR/plots)")
    args = p.parse_args(argv)
    try:
        paths = report(args.run_dir, args.out)
    except (FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
