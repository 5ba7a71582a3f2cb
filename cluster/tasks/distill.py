"""Knowledge distillation as a training task: a frozen teacher's soft targets plus the data loss.

    loss = (1 - alpha) * CE(student, data) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

summed over the batch's targets, like every task's loss (Hinton et al. 2015: the T^2 keeps the
soft term's gradient scale independent of T). The teacher is the latest complete checkpoint of a
run, loaded on each worker once, in evaluation mode, without gradients; the student is any
family (a Performer or Mamba student is the edge-device case). Validation reports the data loss
alone, so student, teacher and a student trained without the teacher compare directly.
The training loop is unchanged: this is a `Task` (cluster/tasks/lm.py), selected by
`train.task: distill` with `train.teacher: RUN_DIR`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cluster import checkpoint
from cluster.tasks.lm import LanguageModeling


def load_teacher(run_dir: str | Path) -> tuple[nn.Module, Any, Path]:
    """(model in eval mode with frozen weights, its config, checkpoint path) of a run's latest checkpoint."""
    import archs
    from cluster.config.job import model_from_dict

    run_dir = Path(run_dir)
    ckpt = checkpoint.latest_complete(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"train.teacher: {run_dir} has no complete checkpoint; train the teacher first "
                                "(python -m jobs.train --name ...) and point train.teacher at its run directory")
    cfg = model_from_dict(checkpoint.read_meta(ckpt)["model"])
    model = archs.build(cfg)
    checkpoint.load_model_weights(ckpt, model, cfg)
    model.eval().requires_grad_(False)
    return model, cfg, ckpt


class Distillation(LanguageModeling):
    def __init__(self, data_path: str, teacher_dir: str, alpha: float, temperature: float, verify: str = "footers"):
        super().__init__(data_path, verify=verify)
        self.teacher_dir, self.alpha, self.temperature = teacher_dir, alpha, temperature
        self._teacher: nn.Module | None = None
        self._teacher_cfg = None

    @classmethod
    def from_config(cls, data_cfg, train_cfg, verify: str = "footers") -> "Distillation":
        if train_cfg is None or train_cfg.teacher is None:
            raise ValueError("train.teacher: task distill needs the teacher's run directory")
        return cls(data_cfg.path, train_cfg.teacher, train_cfg.distill_alpha, train_cfg.distill_temperature, verify)

    def teacher(self, device: torch.device) -> nn.Module:
        if self._teacher is None:
            self._teacher, self._teacher_cfg, _ = load_teacher(self.teacher_dir)
        return self._teacher.to(device)

    def configure_model(self, model_cfg):
        """The student predicts over the teacher's vocabulary (the KL compares the two distributions)."""
        ckpt = checkpoint.latest_complete(self.teacher_dir)
        if ckpt is None:
            raise FileNotFoundError(f"train.teacher: {self.teacher_dir} has no complete checkpoint")
        teacher_vocab = checkpoint.read_meta(ckpt)["model"]["vocab_size"]
        if teacher_vocab < self.meta.vocab_size:
            raise ValueError(f"train.teacher: the teacher's vocabulary ({teacher_vocab}) is smaller than the data's "
                             f"({self.meta.vocab_size}); distil on the data the teacher was trained on")
        if model_cfg.vocab_size is None:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=teacher_vocab)
        if model_cfg.vocab_size != teacher_vocab:
            raise ValueError(f"model.vocab_size: the student's {model_cfg.vocab_size} differs from the teacher's "
                             f"{teacher_vocab}; set it to null (taken from the teacher)")
        return super().configure_model(model_cfg)

    def loss_sum(self, model, batch, device):
        inputs, targets = self.inputs_targets(batch, device)
        logits = model(inputs)
        data = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        if not torch.is_grad_enabled():  # evaluation: the data loss alone
            return data, targets.numel()
        with torch.no_grad():
            teacher_logits = self.teacher(device)(inputs)
        return (1 - self.alpha) * data + self.alpha * self.soft_loss_sum(logits, teacher_logits), targets.numel()

    def soft_loss_sum(self, student_BTV: torch.Tensor, teacher_BTV: torch.Tensor) -> torch.Tensor:
        """T^2 * sum over positions of KL(teacher_T || student_T), in fp32."""
        T = self.temperature
        log_p_student = F.log_softmax(student_BTV.float() / T, dim=-1).flatten(0, 1)
        log_p_teacher = F.log_softmax(teacher_BTV.float() / T, dim=-1).flatten(0, 1)
        return T * T * F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")

    def output_loss_sum(self, logits, targets):
        raise ValueError("train.task: distill needs the inputs beside the student's output (the teacher runs on "
                         "them), which a pipeline's last stage does not have; use parallel.pp: 1")
