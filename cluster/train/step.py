"""One optimizer step over micro-batches (gradient accumulation), and evaluation.

Kept apart from the Ray loop so that tests can drive exactly the code that training runs. The
model is a `parallel.Parallelized` (what `parallel.apply` returns), or a plain/DDP module used as
it is (`parallel.local`). The step talks to the layout through its interface only: the loss
weight of each micro-batch, `no_sync` for accumulation, one `reduce_grads()`, `step_metrics()`;
a pipeline schedule runs the micro-batches when there is one, and only one rank per
data-parallel replica adds its loss to the reported totals. What MoE layers need per step
(auxiliary-loss weights, statistics, bias updates) is installed by `parallel.apply` as hooks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from cluster.train.precision import DynamicLossScaler, autocast
import parallel
from parallel import Parallelized
from parallel.grads import clip_grad_norm


@dataclass
class StepResult:
    loss: float  # mean loss per target over the global batch (all ranks)
    grad_norm: float  # before clipping; inf/nan on an overflowing fp16 step
    skipped: bool  # fp16 overflow: the optimizer did not step
    targets: int  # targets in the global batch
    aux_loss: float | None = None  # MoE auxiliary losses (weighted, summed over layers), step mean
    moe: dict | None = None  # per-layer MoE statistics reduced over ranks (moe.stats.finish_step)
    # Host wall seconds per phase of this step (no device syncs added: on CUDA a phase's device
    # work shows up where the host next waits for it, the loss read-back of "loss_sync").
    phases: dict[str, float] = field(default_factory=dict)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def train_step(model: nn.Module | Parallelized, task, micro_batches: list[np.ndarray],
               optimizer: torch.optim.Optimizer, scaler: DynamicLossScaler, precision: str, device: torch.device,
               grad_clip: float | None, moe_layout=None) -> StepResult:
    """Forward/backward every micro-batch, then (unless fp16 overflowed) clip and step.

    Each micro-batch's summed loss is divided by the targets of this rank's whole step, so the
    accumulated gradient is that of the mean over the step whatever the micro-batch split; DDP
    then averages equal-sized rank shares into the global-batch mean. The layout weights MoE
    auxiliary losses like the task loss of the same micro-batch (`set_loss_weight`) and reduces
    MoE statistics when the optimizer steps. (`moe_layout` is accepted for old callers and
    unused: `parallel.apply` records the whole model's MoE layout itself.)
    """
    t0 = time.perf_counter()
    par = parallel.local(model)
    par.prepare_optimizer(optimizer)  # idempotent: hooks the MoE step work once per optimizer
    local_targets = sum(task.num_targets(b) for b in micro_batches)
    if par.pipeline is not None:
        loss_sum = _pipeline_pass(par, task, micro_batches, scaler, precision, device, local_targets)
    else:
        loss_sum = _accumulate(par, task, micro_batches, scaler, precision, device, local_targets)
    t1 = time.perf_counter()
    par.reduce_grads()  # under DDP the all-reduce overlaps backward: it is then inside forward_backward
    t2 = time.perf_counter()
    params = [p for p in par.model.parameters() if p.grad is not None]
    overflow = scaler.unscale_and_check(params)
    grad_norm = clip_grad_norm(params, grad_clip)
    if not overflow:
        optimizer.step()
    scaler.update(overflow)
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    moe_summary = par.step_metrics()  # once per step, on every rank
    t4 = time.perf_counter()
    totals = torch.stack([loss_sum, torch.tensor(float(local_targets), device=device)])
    totals = _all_reduce_sum(totals if par.counts_loss else torch.zeros_like(totals))
    result = StepResult(loss=(totals[0] / totals[1]).item(), grad_norm=grad_norm.item(), skipped=overflow,
                        targets=int(totals[1].item()), aux_loss=moe_summary.get("aux_loss"),
                        moe=moe_summary or None)
    result.phases = {"forward_backward": t1 - t0, "grad_reduce": t2 - t1, "optimizer": t3 - t2,
                     "moe_statistics": t4 - t3, "loss_sync": time.perf_counter() - t4}
    return result


def _accumulate(par: Parallelized, task, micro_batches, scaler, precision, device, local_targets) -> torch.Tensor:
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        par.set_loss_weight(scaler.scale * task.num_targets(batch) / local_targets)
        # NOTE: gradients are all-reduced once, on the last micro-batch only.
        with par.no_sync(last=i == len(micro_batches) - 1):
            with autocast(precision, device):
                loss, _ = task.loss_sum(par.forward_model, batch, device)
            scaler.scale_loss(loss / local_targets).backward()
        loss_sum += loss.detach()
    return loss_sum


def _pipeline_pass(par: Parallelized, task, micro_batches, scaler, precision, device,
                   local_targets) -> torch.Tensor:
    """The step's sequences as `par.microbatches` equal pipeline micro-batches (default: the step's
    own micro-batches); the loss is computed on the last stage, per micro-batch."""
    inputs, targets = task.inputs_targets(np.concatenate(micro_batches), device)
    n_micro = par.microbatches or len(micro_batches)
    par.set_loss_weight(scaler.scale / n_micro)  # equal micro-batches: equal shares
    sums: list[torch.Tensor] = []

    def loss_fn(output, target):
        loss = task.output_loss_sum(output, target)
        sums.append(loss.detach())
        return scaler.scale_loss(loss / local_targets)

    with autocast(precision, device):
        par.pipeline.run(inputs, targets, n_micro, loss_fn)
    return torch.stack(sums).sum() if sums else torch.zeros((), device=device)


def evaluate(model: nn.Module | Parallelized, task, batches: list[np.ndarray], precision: str,
             device: torch.device) -> float:
    """Mean loss per target over every rank's evaluation batches (ranks may hold unequal counts)."""
    return _evaluate(model, task, batches, precision, device)[0]


def evaluate_task(model: nn.Module | Parallelized, task, batches: list[np.ndarray], precision: str,
                  device: torch.device) -> dict[str, float]:
    """The task's evaluation metrics: `task.eval_metrics(mean loss)` plus the means of the
    task's `eval_sums` metrics (e.g. MAE, matching accuracy) over every rank's batches."""
    loss, extra = _evaluate(model, task, batches, precision, device)
    return {**task.eval_metrics(loss), **extra}


@torch.no_grad()
def _evaluate(model, task, batches, precision, device) -> tuple[float, dict[str, float]]:
    par = parallel.local(model)
    plain = par.model
    was_training = plain.training
    plain.eval()
    names = list(getattr(task, "metric_names", ()))
    # One fixed-size vector (loss sum, count, then a sum and a count per metric): a rank without
    # evaluation batches, or without some metric, still joins the same single all-reduce.
    totals = torch.zeros(2 + 2 * len(names), device=device, dtype=torch.float64)
    for batch in batches:
        forward_model = par.forward_model
        sums: dict = {}
        with autocast(precision, device):
            if par.pipeline is not None:
                loss, n = _pipeline_eval(par, task, batch, device)
            elif names:  # the task's metrics come from the same forward as its loss
                loss, n, sums = task.eval_sums(forward_model, batch, device)
            else:
                loss, n = task.loss_sum(forward_model, batch, device)
        totals[:2] += torch.stack([loss.detach().double(), torch.tensor(float(n), device=device, dtype=torch.float64)])
        for i, name in enumerate(names):
            if name in sums:
                totals[2 + 2 * i] += sums[name][0]
                totals[3 + 2 * i] += sums[name][1]
    if not par.counts_loss:
        totals.zero_()
    _all_reduce_sum(totals)
    plain.train(was_training)
    t = totals.tolist()
    extra = {name: t[2 + 2 * i] / t[3 + 2 * i] for i, name in enumerate(names) if t[3 + 2 * i] > 0}
    return t[0] / max(t[1], 1.0), extra


def _pipeline_eval(par: Parallelized, task, batch, device) -> tuple[torch.Tensor, int]:
    inputs, targets = task.inputs_targets(batch, device)
    sums: list[torch.Tensor] = []

    def loss_fn(output, target):
        sums.append(task.output_loss_sum(output, target))
        return sums[-1]

    par.pipeline.run(inputs, targets, 1, loss_fn, train=False)
    return (sums[0] if sums else torch.zeros((), device=device)), targets.numel()
