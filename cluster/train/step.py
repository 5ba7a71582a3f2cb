"""One optimizer step over micro-batches (gradient accumulation), and evaluation.

Kept apart from the Ray loop so that tests can drive exactly the code that training runs. The
model is a plain/DDP module, or a `parallel.Parallelized` (tensor/pipeline layouts): then a
pipeline schedule runs the micro-batches, gradients are reduced by the layout, and only one rank
per data-parallel replica adds its loss to the reported totals.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from cluster.train.precision import DynamicLossScaler, autocast
from moe.layer import moe_layers, set_aux_loss_scale
from moe.stats import finish_step
from parallel import Parallelized
from parallel.expert_parallel import reduce_expert_grads
from parallel.grads import clip_grad_norm


@dataclass
class StepResult:
    loss: float  # mean loss per target over the global batch (all ranks)
    grad_norm: float  # before clipping; inf/nan on an overflowing fp16 step
    skipped: bool  # fp16 overflow: the optimizer did not step
    targets: int  # targets in the global batch
    aux_loss: float | None = None  # MoE auxiliary losses (weighted, summed over layers), step mean
    moe: dict | None = None  # per-layer MoE statistics reduced over ranks (moe.stats.finish_step)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def train_step(model: nn.Module | Parallelized, task, micro_batches: list[np.ndarray],
               optimizer: torch.optim.Optimizer, scaler: DynamicLossScaler, precision: str, device: torch.device,
               grad_clip: float | None, moe_layout: tuple[list[int], int] | None = None) -> StepResult:
    """Forward/backward every micro-batch, then (unless fp16 overflowed) clip and step.

    Each micro-batch's summed loss is divided by the targets of this rank's whole step, so the
    accumulated gradient is that of the mean over the step whatever the micro-batch split; DDP
    then averages equal-sized rank shares into the global-batch mean. MoE auxiliary losses get
    the same weight as their micro-batch's task loss (see moe.losses.attach_aux_loss).
    `moe_layout` = (every MoE layer id of the model, experts per layer) fixes the shape of the
    statistics reduction even on a rank that holds none of them (a pipeline stage).
    """
    par = model if isinstance(model, Parallelized) else None
    plain = par.model if par else model
    layers = moe_layers(plain)
    local_targets = sum(task.num_targets(b) for b in micro_batches)
    if par is not None and par.pipeline is not None:
        loss_sum = _pipeline_pass(par, task, micro_batches, layers, scaler, precision, device, local_targets)
    else:
        loss_sum = _accumulate(par.forward_model if par else model, task, micro_batches, layers, scaler,
                               precision, device, local_targets)
    if par is not None:
        par.reduce_grads()
    else:
        reduce_expert_grads(model)  # no-op without expert parallelism
    params = [p for p in plain.parameters() if p.grad is not None]
    overflow = scaler.unscale_and_check(params)
    grad_norm = clip_grad_norm(params, grad_clip)
    if not overflow:
        optimizer.step()
    scaler.update(overflow)
    optimizer.zero_grad(set_to_none=True)
    if par is not None and not par.counts_moe_stats:
        for layer in layers:  # NOTE: TP ranks saw the same routing; TP rank 0 reports it
            layer.stats.take(device)
    ids, num_experts = moe_layout or (None, None)
    moe_summary = finish_step(layers, device, update_bias=not overflow, layer_ids=ids,
                              num_experts=num_experts)  # once per step, on every rank
    counted = par is None or par.counts_loss
    totals = torch.stack([loss_sum, torch.tensor(float(local_targets), device=device)])
    totals = _all_reduce_sum(totals if counted else torch.zeros_like(totals))
    return StepResult(loss=(totals[0] / totals[1]).item(), grad_norm=grad_norm.item(), skipped=overflow,
                      targets=int(totals[1].item()), aux_loss=moe_summary.get("aux_loss"),
                      moe=moe_summary or None)


def _accumulate(model, task, micro_batches, layers, scaler, precision, device, local_targets) -> torch.Tensor:
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        set_aux_loss_scale(layers, scaler.scale * task.num_targets(batch) / local_targets)
        last = i == len(micro_batches) - 1
        # NOTE: gradients are all-reduced once, on the last micro-batch only.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(precision, device):
                loss, _ = task.loss_sum(model, batch, device)
            scaler.scale_loss(loss / local_targets).backward()
        loss_sum += loss.detach()
    return loss_sum


def _pipeline_pass(par: Parallelized, task, micro_batches, layers, scaler, precision, device,
                   local_targets) -> torch.Tensor:
    """The step's sequences as `par.microbatches` equal pipeline micro-batches (default: the step's
    own micro-batches); the loss is computed on the last stage, per micro-batch."""
    inputs, targets = task.inputs_targets(np.concatenate(micro_batches), device)
    n_micro = par.microbatches or len(micro_batches)
    set_aux_loss_scale(layers, scaler.scale / n_micro)  # equal micro-batches: equal shares
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
    par = model if isinstance(model, Parallelized) else None
    plain = par.model if par else model
    was_training = plain.training
    plain.eval()
    names = list(getattr(task, "metric_names", ()))
    # One fixed-size vector (loss sum, count, then a sum and a count per metric): a rank without
    # evaluation batches, or without some metric, still joins the same single all-reduce.
    totals = torch.zeros(2 + 2 * len(names), device=device, dtype=torch.float64)
    for batch in batches:
        forward_model = par.forward_model if par else model
        sums: dict = {}
        with autocast(precision, device):
            if par is not None and par.pipeline is not None:
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
    if par is not None and not par.counts_loss:
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
