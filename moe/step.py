"""The per-step work of a model's MoE layers, as hooks: the training step never touches MoE internals.

`MoEStep` is installed by `parallel.apply` (one per rank) and does, for every MoE layer the rank
holds:
- `set_loss_weight(w)`: the weight of the coming micro-batch's loss in the step (its share of the
  step's targets x the loss scale), given to each layer's auxiliary-loss gradient, so the
  balancing losses are weighted like the task loss of the same micro-batch;
- an optimizer step pre-hook (`attach`): reduce the step's statistics over all ranks in one
  fixed-size all-reduce and update the balancing biases. It runs only when the optimizer really
  steps, so under gradient accumulation the bias moves once per step, from the whole step's load,
  and a skipped fp16 step (overflow) leaves it alone;
- `summary()`: the reduced statistics of the step just finished (per layer, with the exchange
  time of its dispatcher); after a skipped step it reduces them here, without the bias update.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from moe.layer import moe_layers
from moe.stats import finish_step


class MoEStep:
    """This rank's MoE layers of one model (`layer_ids`/`num_experts`: those of the whole model,
    so a pipeline stage without MoE layers still joins the reduction with the same shape)."""

    def __init__(self, model: nn.Module, layer_ids: list[int], num_experts: int, device: torch.device,
                 counts_stats: bool = True, group: dist.ProcessGroup | None = None):
        self.layers = moe_layers(model)
        self.layer_ids, self.num_experts, self.device = sorted(layer_ids), num_experts, device
        # NOTE: TP ranks see the same routing; only TP rank 0 adds its statistics to the reduction.
        self.counts_stats, self.group = counts_stats, group
        self._summary: dict | None = None
        self._hooked: set[int] = set()

    def set_loss_weight(self, weight: float) -> None:
        for layer in self.layers:
            layer.aux_loss_scale = weight

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Reduce and update biases just before every step of `optimizer` (once per optimizer)."""
        if id(optimizer) not in self._hooked:
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step())
            self._hooked.add(id(optimizer))

    def _before_step(self) -> None:
        # NOTE: once per step even if the hook fires twice: torch wraps `step` per optimizer class,
        # so a subclass whose `step` calls `super().step()` runs the pre-hooks in both wrappers.
        if self._summary is None:
            self._reduce(update_bias=True)

    def _reduce(self, update_bias: bool) -> None:
        if not self.counts_stats:
            for layer in self.layers:
                layer.stats.take(self.device)
        summary = finish_step(self.layers, self.device, update_bias=update_bias, group=self.group,
                              layer_ids=self.layer_ids, num_experts=self.num_experts)
        held = {layer.layer_id: layer for layer in self.layers}
        for row in summary.get("layers", []):
            layer = held.get(row["layer"])
            row["a2a_s"] = layer.dispatcher.exchange_seconds() if layer is not None else 0.0
        self._summary = summary

    def summary(self) -> dict:
        """The statistics of the step just finished ({} without MoE layers anywhere)."""
        if self._summary is None:  # the optimizer did not step (fp16 overflow): reduce, keep the biases
            self._reduce(update_bias=False)
        summary, self._summary = self._summary, None
        return summary
