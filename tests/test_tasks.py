"""The forecasting and image-text tasks through the training loop: metrics equal their
definitions, a short run on the real digits matches captions well above chance, and both
tasks train on 2 Ray Train workers with their metric in the summary."""
import numpy as np
import pytest
import torch

import archs
from cluster.train.precision import DynamicLossScaler
from cluster.config.job import load_config
from cluster.tasks.forecast import Forecasting
from cluster.data.forecast import prepare_forecast
from cluster.tasks.image_text import ImageText
from cluster.data.image_text import prepare_image_text
from cluster.train.optim import build_optimizer
from cluster.train.step import evaluate_task, train_step
from cluster.train.driver import fit, read_metrics, step_losses

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("tasks") / "digits"
    prepare_image_text("digits", path)
    return path


def test_forecast_mae_is_the_mean_absolute_error_in_series_units(tmp_path):
    prepare_forecast("sunspots", tmp_path / "sun", context_len=32, horizon=8)
    task = Forecasting(str(tmp_path / "sun"))
    cfg = task.configure_model(load_config("forecast_debug").model)
    torch.manual_seed(0)
    model = archs.build(cfg).eval()
    batches = task.eval_batches(64, 16, 0, 1)
    got = evaluate_task(model, task, batches, "fp32", CPU)
    std, mean = np.array(task.meta.info["std"]), np.array(task.meta.info["mean"])
    errors = []
    with torch.no_grad():
        for b in batches:
            pred = model(torch.from_numpy(b["x"])).numpy()
            errors.append(np.abs((pred * std + mean) - (b["y"] * std + mean)).ravel())
    assert got["val_mae"] == pytest.approx(np.concatenate(errors).mean(), rel=1e-5)
    assert got["val_loss"] == pytest.approx(np.mean(np.concatenate(
        [((model(torch.from_numpy(b["x"])).detach().numpy() - b["y"]) ** 2).ravel() for b in batches])), rel=1e-5)


def test_a_short_run_on_the_digits_matches_captions_far_above_chance(digits):
    task = ImageText(str(digits))
    cfg = task.configure_model(load_config("image_text_dual").model)
    torch.manual_seed(0)
    model = archs.build(cfg)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    batches = task.train_batches(32, 32, 0, 1, seed=0)
    evals = task.eval_batches(200, 32, 0, 1)
    before = evaluate_task(model, task, evals, "fp32", CPU)
    for step in range(60):
        train_step(model, task, batches.batches_for_step(step * 32), opt, DynamicLossScaler(False), "fp32", CPU, 1.0)
    after = evaluate_task(model, task, evals, "fp32", CPU)
    assert after["match_acc"] >= 0.5 > before["match_acc"]  # 10 candidates: chance is 0.1
    assert after["recall_at_1"] > before["recall_at_1"] and after["val_loss"] < before["val_loss"]


@pytest.mark.ray
@pytest.mark.parametrize("config,metric", [("forecast_debug", "val_mae"), ("image_text_debug", "match_acc")])
def test_the_task_trains_on_two_ray_workers(ray_cluster, tmp_path, config, metric):
    job = load_config(config, [f"cluster.storage_path={tmp_path}", "cluster.run_name=run",
                               f"data.path={tmp_path / 'data'}", "metrics.prometheus=false"])
    summary = fit(job)
    assert summary["steps"] == job.train.steps and summary["world_size"] == 2
    assert metric in summary["last_eval"] and summary["last_val_loss"] < summary["first_val_loss"]
    evals = [r for r in read_metrics(tmp_path / "run") if metric in r]
    assert len(evals) >= 2 and all(np.isfinite(r[metric]) for r in evals)
    losses = step_losses(read_metrics(tmp_path / "run"))
    assert losses[job.train.steps] < losses[1]


def test_bench_tasks_writes_its_table(tmp_path, capsys):
    from jobs.bench import main

    out = tmp_path / "tasks.json"
    assert main(["tasks", "--seeds", "1", "--forecast-steps", "2", "--fusion-steps", "2", "--eval-limit", "40",
                 "--out", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert [r["model"] for r in result["forecast"]] == ["rnn_transformer", "ts_transformer"]
    assert [r["variant"] for r in result["fusion"]] == ["dual_tower", "cross_attention", "shared"]
    assert all(r["mae_ppm"]["mean"] > 0 for r in result["forecast"])
    assert all(0 <= r["match_acc"]["mean"] <= 1 for r in result["fusion"])
    assert "the seed claims -18%" in capsys.readouterr().out
