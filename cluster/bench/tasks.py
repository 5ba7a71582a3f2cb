"""python -m jobs.bench tasks: the seed's two task claims, measured on the bundled data.

  python -m jobs.bench tasks                 # forecasters on CO2 (3 seeds), fusion variants on digits
  python -m jobs.bench tasks --quick --out bench_results/tasks.json

Forecasting: the RNN-transformer hybrid against the plain transformer forecaster of equal size
(`small` presets: 96-week window, 24-week horizon), MAE in ppm on the held-out last 20% of the
CO2 series, mean and spread over seeds. Image-text: dual tower, cross-attention and shared
parameters on the 8x8 digits with captions made from their labels: matching accuracy among 10
candidate captions and image -> caption recall@1 among 20 held-out pairs. Equal budgets: the
same steps, batch, learning rate and schedule for every model; parameter counts are reported.
Single process, fp32, no Ray: the figures are about the models, not the cluster.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import archs
from cluster.train.precision import DynamicLossScaler
from cluster.config.job import load_config
from cluster.tasks.forecast import Forecasting
from cluster.data.forecast import prepare_forecast
from cluster.tasks.image_text import ImageText
from cluster.data.image_text import prepare_image_text
from cluster.train.optim import build_optimizer, build_scheduler
from cluster.train.step import evaluate_task, train_step

CPU = torch.device("cpu")


def train_and_eval(task, config: str, seed: int, steps: int, batch: int, lr: float, eval_n: int,
                   overrides: list[str] | None = None) -> dict:
    cfg = task.configure_model(load_config(config, overrides or []).model)
    torch.manual_seed(seed)
    model = archs.build(cfg)
    opt = build_optimizer(model, lr, 0.1, (0.9, 0.95))
    sched = build_scheduler(opt, max(1, steps // 20), steps, 0.1)
    batches = task.train_batches(batch, batch, 0, 1, seed)
    t0 = time.perf_counter()
    for step in range(steps):
        train_step(model, task, batches.batches_for_step(step * batch), opt, DynamicLossScaler(False), "fp32", CPU, 1.0)
        sched.step()
    train_s = time.perf_counter() - t0
    metrics = evaluate_task(model, task, task.eval_batches(eval_n, 64, 0, 1), "fp32", CPU)
    return {"seed": seed, "train_s": train_s, "params": sum(p.numel() for p in model.parameters()), **metrics}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def bench_forecast(args, tmp: Path) -> list[dict]:
    prepare_forecast("co2", tmp / "co2", context_len=96, horizon=24)
    task = Forecasting(str(tmp / "co2"))
    rows = []
    for name, config in (("rnn_transformer", "forecast_rnn"), ("ts_transformer", "forecast_transformer")):
        runs = []
        for seed in range(args.seeds):
            runs.append(train_and_eval(task, config, seed, args.forecast_steps, 32, 2e-3, args.eval_limit))
            print(f"[bench] forecast {name:16s} seed {seed}: MAE {runs[-1]['val_mae']:.3f} ppm "
                  f"({runs[-1]['train_s']:.1f} s)", flush=True)
        rows.append({"model": name, "params": runs[0]["params"], "mae_ppm": spread([r["val_mae"] for r in runs]),
                     "val_mse_std_units": spread([r["val_loss"] for r in runs]),
                     "train_s": spread([r["train_s"] for r in runs]), "runs": runs})
    return rows


def bench_fusion(args, tmp: Path) -> list[dict]:
    prepare_image_text("digits", tmp / "digits")
    task = ImageText(str(tmp / "digits"))
    rows = []
    for variant in ("dual_tower", "cross_attention", "shared"):
        runs = []
        for seed in range(args.seeds):
            runs.append(train_and_eval(task, "image_text_dual", seed, args.fusion_steps, 32, 1e-3, args.eval_limit,
                                       [f"model.variant={variant}"]))
            print(f"[bench] image-text {variant:15s} seed {seed}: match@10 {runs[-1]['match_acc']:.3f}  "
                  f"R@1 {runs[-1]['recall_at_1']:.3f} ({runs[-1]['train_s']:.1f} s)", flush=True)
        rows.append({"variant": variant, "params": runs[0]["params"],
                     "match_acc": spread([r["match_acc"] for r in runs]),
                     "recall_at_1": spread([r["recall_at_1"] for r in runs]),
                     "train_s": spread([r["train_s"] for r in runs]), "runs": runs})
    return rows


def main(argv=None, from_cli: bool = False) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="runs per model (default: 3)")
    p.add_argument("--forecast-steps", type=int, default=300, help="optimizer steps per forecaster (default: 300)")
    p.add_argument("--fusion-steps", type=int, default=200, help="optimizer steps per image-text model (default: 200)")
    p.add_argument("--quick", action="store_true", help="2 seeds, 40 / 30 steps: checks the plumbing, not the claims")
    p.add_argument("--eval-limit", type=int, default=100_000, help="held-out samples evaluated (default: all)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.forecast_steps, args.fusion_steps = 2, 40, 30
    if args.seeds < 1 or args.forecast_steps < 1 or args.fusion_steps < 1:
        p.error("--seeds, --forecast-steps and --fusion-steps must be >= 1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="raymoe-bench-tasks-") as tmp:
        forecast = bench_forecast(args, Path(tmp))
        fusion = bench_fusion(args, Path(tmp))
    hybrid, plain = forecast[0]["mae_ppm"]["mean"], forecast[1]["mae_ppm"]["mean"]
    dual = next(r for r in fusion if r["variant"] == "dual_tower")["match_acc"]["mean"]
    cross = next(r for r in fusion if r["variant"] == "cross_attention")["match_acc"]["mean"]
    claims = {"hybrid_mae_change_vs_plain": hybrid / plain - 1, "seed_claims_hybrid_mae_change": -0.18,
              "cross_attention_match_acc_change_vs_dual_tower": cross - dual,
              "seed_claims_cross_attention_match_acc_gain": 0.24}
    print("\nforecasting, CO2 (MAE in ppm on the held-out tail, mean +- std over seeds)")
    for r in forecast:
        print(f"  {r['model']:16s} {r['params']:>9,} params  MAE {r['mae_ppm']['mean']:.3f} +- {r['mae_ppm']['std']:.3f}"
              f"  train {r['train_s']['mean']:.1f} s")
    print("image-text, digits (matching accuracy among 10 captions, recall@1 among 20 pairs)")
    for r in fusion:
        print(f"  {r['variant']:16s} {r['params']:>9,} params  match@10 {r['match_acc']['mean']:.3f} +- "
              f"{r['match_acc']['std']:.3f}  R@1 {r['recall_at_1']['mean']:.3f}  train {r['train_s']['mean']:.1f} s")
    print(f"hybrid vs plain MAE: {100 * claims['hybrid_mae_change_vs_plain']:+.1f}% (the seed claims -18%); "
          f"cross-attention vs dual tower matching: {100 * claims['cross_attention_match_acc_change_vs_dual_tower']:+.1f} "
          "points (the seed claims +24%)")
    result = {"forecast": forecast, "fusion": fusion, "claims": claims,
              "settings": {"seeds": args.seeds, "forecast_steps": args.forecast_steps,
                           "fusion_steps": args.fusion_steps, "batch": 32, "threads": 1}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(from_cli=True))
