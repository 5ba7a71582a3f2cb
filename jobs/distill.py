"""Distil a trained run (the teacher) into a smaller student of any family, on Ray Train.

  python -m jobs.distill --teacher runs/TEACHER --config performer --set train.steps=300
  python -m jobs.distill --teacher runs/TEACHER --config mamba --set model.d_model=128 --name edge-student

The student trains through the same loop as `jobs.train` (train.task: distill, cluster/tasks/distill.py):
loss = (1 - alpha) * data cross-entropy + alpha * T^2 * KL(teacher_T || student_T), with
`train.distill_alpha` and `train.distill_temperature` (--set). The data default to the teacher's
dataset. The summary (also RUN_DIR/distill_summary.json) compares the student's validation
perplexity and size with the teacher's on the same validation sequences.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the teacher's run directory (its latest complete checkpoint)")
    p.add_argument("--config", default="default", help="the student's job config (YAML or jobs/configs name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.distill_alpha=0.7")
    p.add_argument("--name", help="run name of the student (an existing one resumes)")
    return p.parse_args(argv)


def build_job(args):
    """The student's JobConfig: the teacher's data unless overridden, task distill."""
    import yaml

    from cluster.config.job import load_config

    teacher = Path(args.teacher).resolve()
    if not (teacher / "config.yaml").is_file():
        raise FileNotFoundError(f"--teacher: {teacher} is not a run directory (no config.yaml); "
                                "give the directory `python -m jobs.train` wrote")
    data = (yaml.safe_load((teacher / "config.yaml").read_text()) or {}).get("data", {})
    inherited = [f"data.{k}={data[k]}" for k in ("path", "seq_len", "tokenizer") if k in data]
    overrides = inherited + args.overrides + ["train.task=distill", f"train.teacher={teacher}"]
    if args.name:
        overrides.append(f"cluster.run_name={args.name}")
    return load_config(args.config, overrides)


def compare(summary: dict, job) -> dict:
    """Teacher vs student on the validation sequences the loop evaluated, and their sizes."""
    from cluster.deploy import serving as deploy
    from cluster.data.tokens import TokenDataset, eval_batches
    from cluster.tasks.distill import load_teacher
    from cluster.deploy.load import load_run

    batches = eval_batches(TokenDataset(job.data.path, "val"), job.train.eval_sequences, job.train.micro_batch_size, 0, 1)
    teacher, _, teacher_ckpt = load_teacher(job.train.teacher)
    student, _, student_ckpt = load_run(summary["run_dir"])
    t_loss, s_loss = deploy.eval_loss(teacher, batches), deploy.eval_loss(student, batches)
    t_params = sum(p.numel() for p in teacher.parameters())
    s_params = sum(p.numel() for p in student.parameters())
    return {
        "teacher": {"run_dir": job.train.teacher, "checkpoint": str(teacher_ckpt), "arch": teacher.cfg.arch,
                    "parameters": t_params, "fp32_bytes": deploy.model_bytes(teacher), "val_loss": t_loss,
                    "val_ppl": math.exp(t_loss)},
        "student": {"run_dir": summary["run_dir"], "checkpoint": str(student_ckpt), "arch": student.cfg.arch,
                    "parameters": s_params, "fp32_bytes": deploy.model_bytes(student), "val_loss": s_loss,
                    "val_ppl": math.exp(s_loss)},
        "size_ratio": t_params / s_params, "ppl_ratio": math.exp(s_loss - t_loss),
        "alpha": job.train.distill_alpha, "temperature": job.train.distill_temperature,
        "eval_sequences": sum(len(b) for b in batches),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from cluster.config.typed import ConfigError

    try:
        job = build_job(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from cluster import checkpoint
    from cluster.train.driver import fit
    from jobs.train import print_summary

    try:
        summary = fit(job)
        report = {**summary, "distillation": compare(summary, job)}
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = Path(summary["run_dir"]) / "distill_summary.json"
    path.write_text(json.dumps(report, indent=1))
    print_summary(summary)
    d = report["distillation"]
    t, s = d["teacher"], d["student"]
    print(f"  teacher          {t['arch']}, {t['parameters']:,} parameters, val ppl {t['val_ppl']:.3f}")
    print(f"  student          {s['arch']}, {s['parameters']:,} parameters ({d['size_ratio']:.1f}x smaller), "
          f"val ppl {s['val_ppl']:.3f} ({d['ppl_ratio']:.3f}x the teacher's)")
    print(f"  distill summary  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
