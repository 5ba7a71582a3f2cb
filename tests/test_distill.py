"""Distillation: the task's loss, a distilled student beating the same student trained without the
teacher, and `jobs.distill` on Ray Train (2 workers, an MoE student at EP=2)."""
import json

import pytest
import torch
import torch.nn.functional as F

from cluster import checkpoint
from cluster.deploy import serving as deploy
from cluster.config.job import load_config
from cluster.config.typed import ConfigError
from cluster.tasks.distill import Distillation
from cluster.bench.deploy import train_local
from cluster.deploy.load import load_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STUDENT = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_data):
    """The debug transformer trained 500 steps in-process (validation loss ~2.2 nats vs ~3 for the student)."""
    job = load_config("debug", ["train.steps=500", f"data.path={tiny_data}", "train.eval_interval=0",
                                "train.global_batch_size=8", "train.micro_batch_size=8", "train.warmup_steps=10",
                                "cluster.num_workers=1"])
    return train_local(job, tmp_path_factory.mktemp("teacher") / "run", log_every=10_000)


def student_job(tiny_data, steps, teacher=None, extra=()):
    over = [f"train.steps={steps}", f"data.path={tiny_data}", "train.eval_interval=0", f"train.warmup_steps={min(4, steps)}",
            "cluster.num_workers=1", *STUDENT, *extra]
    if teacher is not None:
        over += ["train.task=distill", f"train.teacher={teacher}", "train.distill_alpha=0.9"]
    return load_config("debug", over)


def test_distillation_loss_is_the_mix_of_data_and_kl(teacher, tiny_data):
    job = student_job(tiny_data, 1, teacher, ["train.distill_temperature=2.0"])
    task = Distillation.from_config(job.data, job.train)
    torch.manual_seed(0)
    import archs

    student = archs.build(task.configure_model(job.model)).train()
    batch = task.eval_batches(2, 2, 0, 1)[0]
    loss, n = task.loss_sum(student, batch, torch.device("cpu"))
    tokens = torch.from_numpy(batch).long()
    s, t = student(tokens[:, :-1]), task.teacher(torch.device("cpu"))(tokens[:, :-1])
    ce = F.cross_entropy(s.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    kl = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum()
    torch.testing.assert_close(loss, 0.1 * ce + 0.9 * 4 * kl, rtol=1e-5, atol=1e-4)
    assert n == tokens[:, 1:].numel()
    with torch.no_grad():  # evaluation: the data loss alone
        torch.testing.assert_close(task.loss_sum(student, batch, torch.device("cpu"))[0], ce, rtol=1e-5, atol=1e-4)


def test_distilled_student_beats_the_same_student_trained_without_the_teacher(teacher, tiny_data, tmp_path):
    batch = deploy.validation_batches(teacher, 32)  # a fixed batch: the first 32 validation rows
    losses = {}
    for name, t in (("plain", None), ("distilled", teacher)):
        run = train_local(student_job(tiny_data, 200, t), tmp_path / name, log_every=10_000)
        losses[name] = deploy.eval_loss(load_run(run)[0], batch)
    losses["teacher"] = deploy.eval_loss(load_run(teacher)[0], batch)
    assert losses["teacher"] < losses["distilled"] < losses["plain"], losses


def test_distillation_config_errors(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="teacher: set it"):
        load_config("debug", ["train.task=distill"])
    with pytest.raises(ConfigError, match="distill_alpha"):
        load_config("debug", ["train.task=distill", "train.teacher=x", "train.distill_alpha=1.5"])
    job = student_job(tiny_data, 1, tmp_path)
    with pytest.raises(FileNotFoundError, match="train.teacher: .* has no complete checkpoint"):
        Distillation.from_config(job.data, job.train).configure_model(job.model)


@pytest.mark.ray
def test_distill_job_on_ray_train_reports_student_against_teacher(ray_cluster, teacher, tmp_path):
    from jobs import distill

    args = ["--teacher", str(teacher), "--config", "moe_debug", "--name", "student",
            "--set", f"cluster.storage_path={tmp_path}", "--set", "parallel.ep=2", "--set", "train.steps=4",
            "--set", "train.checkpoint_interval=4", "--set", "train.eval_interval=4", "--set", "metrics.prometheus=false",
            *[f"--set={o}" for o in STUDENT], "--set", "model.moe.expert_hidden=16"]
    assert distill.main(args) == 0
    run = tmp_path / "student"
    report = json.loads((run / "distill_summary.json").read_text())
    d = report["distillation"]
    assert d["teacher"]["arch"] == "transformer" and d["student"]["arch"] == "moe_transformer"
    assert d["student"]["parameters"] < d["teacher"]["parameters"] and d["size_ratio"] > 1
    assert d["teacher"]["val_ppl"] < d["student"]["val_ppl"]
    # The student's checkpoint was written by 2 workers with the experts split (EP=2); it loads on one process.
    ckpt = checkpoint.latest_complete(run)
    assert checkpoint.read_meta(ckpt)["world_size"] == 2
    assert report["steps"] == 4 and report["last_val_loss"] == pytest.approx(d["student"]["val_loss"], rel=1e-4)


def test_distill_job_help_and_missing_teacher(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    r = subprocess.run([sys.executable, "-m", "jobs.distill", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and "usage: python -m jobs.distill" in r.stdout and "--teacher" in r.stdout
    r = subprocess.run([sys.executable, "-m", "jobs.distill", "--teacher", str(tmp_path)], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 2 and "is not a run directory" in r.stderr
