"""Dispatch: capacity dropping, permutation into expert-contiguous rows, and the weighted combine.

`LocalDispatcher` does no communication. Expert parallelism replaces it (from `parallel/`)
with an all-to-all dispatcher, and tensor parallelism wraps either in a token splitter: all three
implement the `Dispatcher` protocol below, and nothing else is asked of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from moe.router import Routing


@dataclass
class Dispatched:
    x_MC: torch.Tensor  # kept token copies, sorted by expert
    group_sizes_E: torch.Tensor  # int64 [E] rows per expert in x_MC
    token_M: torch.Tensor  # int64 [M] source token of each row
    weight_M: torch.Tensor  # fp32 [M] combine weight of each row
    dropped: torch.Tensor  # int64 scalar: copies dropped by capacity
    ctx: Any = None  # what a communicating dispatcher needs to reverse its exchange in combine


class Dispatcher(Protocol):
    """How an MoE layer's token copies reach its experts and come back.

    dispatch: capacity dropping (`capacity` None = dropless) and the permutation of the kept copies
    into expert-contiguous rows for this rank's experts (exchanging them with other ranks where the
    experts live elsewhere). combine: the reverse, summing each token's weighted expert outputs
    into [num_tokens, C]. exchange_seconds: wall time spent communicating since the last call
    (0.0 for a dispatcher that does not communicate or does not time itself).

    Optional: `dispatch_compute_combine(x_NC, routing, capacity, drop_policy, experts)` ->
    (out_NC, dropped): all three steps in one call, for a dispatcher that runs the experts
    (`experts(x_MC, group_sizes_E, weight_M)`) between its exchanges to overlap them
    (parallel.expert_parallel.OverlappedAllToAllDispatcher). `MoELayer` calls it when present.
    """

    def dispatch(self, x_NC: torch.Tensor, routing: Routing, capacity: int | None, drop_policy: str) -> Dispatched: ...

    def combine(self, y_MC: torch.Tensor, d: Dispatched, num_tokens: int) -> torch.Tensor: ...

    def exchange_seconds(self) -> float: ...


def keep_order(routing: Routing, capacity: int | None, drop_policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the assignments, sorted by expert, with capacity overflow removed; and the
    kept count per expert. Pure index arithmetic: testable without a model."""
    expert_A, counts_E = routing.expert_A, routing.counts_E
    if capacity is None or routing.capacity_bounded:
        return torch.argsort(expert_A, stable=True), counts_E
    if drop_policy == "score":
        # Highest score first inside each expert: sort by score, then (stably) by expert.
        by_score = torch.argsort(routing.priority_A, descending=True, stable=True)
        order = by_score[torch.argsort(expert_A[by_score], stable=True)]
    else:  # "position": earlier tokens first; assignments are already in token order
        order = torch.argsort(expert_A, stable=True)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_expert = torch.arange(order.numel(), device=order.device) - start_E[expert_A[order]]
    return order[rank_in_expert < capacity], counts_E.clamp(max=capacity)


class LocalDispatcher:
    """All experts on this rank (a `Dispatcher` without communication)."""

    def exchange_seconds(self) -> float:
        return 0.0

    def dispatch(self, x_NC: torch.Tensor, routing: Routing, capacity: int | None, drop_policy: str) -> Dispatched:
        order, group_sizes_E = keep_order(routing, capacity, drop_policy)
        token_M = routing.token_A[order]
        # index_select, not x[token_M]: its backward is index_add (~10x faster on CPU than the
        # accumulating index_put that advanced indexing uses).
        return Dispatched(x_MC=x_NC.index_select(0, token_M), group_sizes_E=group_sizes_E, token_M=token_M,
                          weight_M=routing.weight_A[order], dropped=routing.expert_A.numel() - group_sizes_E.sum())

    def combine(self, y_MC: torch.Tensor, d: Dispatched, num_tokens: int) -> torch.Tensor:
        """out[t] = sum of t's kept (already weighted) expert outputs; dropped copies add nothing."""
        return sum_by_token(y_MC, d.token_M, num_tokens, d.x_MC.dtype)


def sum_by_token(y_MC: torch.Tensor, token_M: torch.Tensor, num_tokens: int, out_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum of the rows of y whose token is t, accumulated in fp32 at least (bf16 experts'
    outputs would lose bits in a bf16 sum of top-k terms), returned in the dtype the tokens came
    in (fp32 under autocast: the residual stream's)."""
    acc = torch.promote_types(y_MC.dtype, torch.float32)
    out = torch.zeros(num_tokens, y_MC.shape[1], dtype=acc, device=y_MC.device)
    return out.index_add(0, token_M, y_MC.to(acc)).to(out_dtype)
