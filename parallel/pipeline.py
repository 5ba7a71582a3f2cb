"""Pipeline parallelism with `torch.distributed.pipelining`: stages cut by layer, GPipe / 1F1B /
interleaved 1F1B schedules, the loss on the last stage.

The model is cut by deleting modules (the blocks of `model.layers` that other ranks hold, the
embedding off the first stage, norm and head off the last), so this rank's pruned model keeps the
checkpoint keys of the whole model and DCP reshards between layouts. Each stage is a thin
`StageModule` over the pruned model's modules that runs embed -> blocks -> norm -> head as far as
the stage goes (the model's own forward expects the whole model).

NOTE: with a tied head (`tie_embeddings`) the last stage keeps its own copy of the embedding
weight (Megatron's way); the two copies start equal and stay equal because their gradients are
summed over the first/last-stage pair (`ProcessGroups.embed`) before the optimizer step.

MoE auxiliary losses need nothing here: each MoE layer attaches its loss's gradient to its output
(`moe.losses.attach_aux_loss`), so a stage's backward carries it, whatever stage holds the layer.

Stage shapes are static (given to `PipelineStage` from the batch shape), so the schedule never runs
an extra metadata-inference forward/backward that would add to the MoE statistics or gradients.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleLoopedBFS)

from parallel.mesh import ProcessGroups

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
STAGES_PER_RANK = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2}
# Evaluation runs one micro-batch at a time, forward only: the order of a schedule does not matter
# there, and 1F1B refuses fewer micro-batches than stages.
EVAL_SCHEDULES = {1: ScheduleGPipe, 2: ScheduleLoopedBFS}


def stage_layers(n_layers: int, num_stages: int, split: list[int] | None = None) -> list[list[int]]:
    """Layer ids of each stage: an even cut by count (earlier stages take the remainder), or
    `split` = the first layer of every stage after the first (e.g. [3] cuts 4 layers into 0-2, 3)."""
    if split is None:
        if num_stages > n_layers:
            raise ValueError(f"parallel.pp: {num_stages} pipeline stages need at least {num_stages} layers "
                             f"(model.n_layers={n_layers})")
        base, extra = divmod(n_layers, num_stages)
        bounds = [0]
        for s in range(num_stages):
            bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    else:
        bounds = [0, *split, n_layers]
        if len(split) != num_stages - 1 or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"parallel.pp_split: {split} must list {num_stages - 1} increasing layer ids in "
                             f"(0, {n_layers}) (the first layer of every stage after the first)")
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


class StageModule(nn.Module):
    """One pipeline stage over the (pruned) model's own modules: tokens or hidden states in,
    hidden states or fp32 logits out."""

    def __init__(self, model: nn.Module, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.embed = model.embed if first else None
        # The model's own ModuleDict (shared, not copied), so that blocks wrapped later (activation
        # checkpointing) are the ones the stage runs; this stage runs `layer_names` of it.
        self.layers = model.layers
        self.layer_names = [str(i) for i in layer_ids]
        self.norm = model.norm if last else None
        self.head = model.head if last else None
        self.head_weight_of = model.embed if last and model.head is None else None  # tied head
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        if self.embed is not None:
            x = self.embed(x)
        for name in self.layer_names:
            x = self.layers[name](x, cos, sin)
        if self.norm is None:
            return x
        x = self.norm(x)
        logits = x @ self.head_weight_of.weight.t() if self.head is None else self.head(x)
        return logits.float()  # fixed dtype whatever autocast did (static stage metadata)


def prune(model: nn.Module, keep: set[int], first: bool, last: bool) -> None:
    """Delete every module this rank's stages do not use; names (checkpoint keys) stay."""
    for name in list(model.layers.keys()):
        if int(name) not in keep:
            del model.layers[name]
    tied = model.head is None
    if not first and not (last and tied):
        model.embed = None
    if not last:
        model.norm = None
        model.head = None


class Pipeline:
    """This rank's pipeline stages and the schedules that drive them (one per batch shape)."""

    def __init__(self, model: nn.Module, groups: ProcessGroups, schedule: str, device: torch.device,
                 split: list[int] | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"parallel.schedule: unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        dims = groups.dims
        self.schedule_name, self.group, self.device = schedule, groups.pp, device
        self.num_stages = dims.pp * STAGES_PER_RANK[schedule]
        cut = stage_layers(len(model.layers), self.num_stages, split)
        pp_rank = dims.coords(groups.rank)[0]
        self.stage_ids = list(range(pp_rank, self.num_stages, dims.pp))  # looped placement
        self.has_first = 0 in self.stage_ids
        self.has_last = self.num_stages - 1 in self.stage_ids
        self.tied = model.head is None
        prune(model, {i for s in self.stage_ids for i in cut[s]}, self.has_first, self.has_last)
        if self.tied and model.embed is not None:
            model.embed.weight.pipeline_tied = True  # one of the two copies (see sync_tied_embedding)
        self.modules = [StageModule(model, cut[s], s == 0, s == self.num_stages - 1) for s in self.stage_ids]
        self.stage_layer_ids = {s: cut[s] for s in self.stage_ids}
        self.d_model, self.vocab = model.cfg.d_model, model.cfg.vocab_size
        self._schedules: dict = {}
        self._loss_fn: Callable | None = None  # the current step's loss (its scale changes per step)

    def _build(self, rows: int, seq: int, n_micro: int, train: bool) -> object:
        mb = rows // n_micro
        hidden = torch.empty(mb, seq, self.d_model, device="meta", requires_grad=True)
        stages = []
        for module, s in zip(self.modules, self.stage_ids):
            inp = torch.empty(mb, seq, dtype=torch.long, device="meta") if s == 0 else hidden
            out = (torch.empty(mb, seq, self.vocab, device="meta", requires_grad=True) if s == self.num_stages - 1
                   else hidden)
            stages.append(PipelineStage(module, s, self.num_stages, self.device, input_args=inp, output_args=out,
                                        group=self.group))
        per_rank = STAGES_PER_RANK[self.schedule_name]
        cls = SCHEDULES[self.schedule_name] if train else EVAL_SCHEDULES[per_rank]
        arg = stages if per_rank > 1 else stages[0]
        return cls(arg, n_micro, loss_fn=lambda logits, targets: self._loss_fn(logits, targets), scale_grads=False)

    def run(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor, n_micro: int,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], train: bool = True) -> None:
        """One pass over `n_micro` equal micro-batches of the batch; `loss_fn(logits, targets)` runs on
        the last stage per micro-batch and its result is what backward starts from (train)."""
        rows, seq = tokens_BT.shape
        if rows % n_micro:
            raise ValueError(f"parallel.microbatches: {n_micro} does not divide the {rows} sequences of this "
                             "rank's step")
        key = (rows, seq, n_micro, train)
        if key not in self._schedules:
            self._schedules[key] = self._build(rows, seq, n_micro, train)
        schedule = self._schedules[key]
        self._loss_fn = loss_fn
        args = (tokens_BT,) if self.has_first else ()
        target = targets_BT if self.has_last else None
        if train:
            schedule.step(*args, target=target, return_outputs=False)
        else:
            with torch.no_grad():
                schedule.eval(*args, target=target)


def sync_tied_embedding(model: nn.Module, groups: ProcessGroups) -> None:
    """Sum the tied embedding's gradient over its first- and last-stage copies."""
    embed = getattr(model, "embed", None)
    if embed is None or not getattr(embed.weight, "pipeline_tied", False) or embed.weight.grad is None:
        return
    grad = embed.weight.grad
    # Under FSDP a DTensor shard: both copies hold the same shard (same dp rank), sum the shards.
    dist.all_reduce(grad._local_tensor if hasattr(grad, "_local_tensor") else grad, group=groups.embed)
