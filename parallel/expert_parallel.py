"""Expert parallelism, applied from outside: shard experts over the EP group, exchange tokens.

`apply_expert_parallel(model, groups)` keeps the experts [r*E/ep, (r+1)*E/ep) of every MoE layer
on EP rank r and swaps the layer's `LocalDispatcher` for an `AllToAllDispatcher` (or, with
`ep_overlap_chunks` > 1, an `OverlappedAllToAllDispatcher` that pipelines the exchanges with the
expert compute); the model code does not change. Expert gradients are then reduced over the expert-data-parallel group only
(`reduce_expert_grads`), everything else over all data-parallel ranks (DDP, which ignores them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from moe.dispatcher import Dispatched, keep_order, sum_by_token
from moe.router import Routing
from moe.layer import moe_layers
from parallel.mesh import ProcessGroups


class ExchangeTimer:
    """Wall time spent inside the exchanges (both directions), for `python -m jobs.bench ep`.

    NOTE: on CUDA the collectives are asynchronous; the timer synchronises the device around them,
    which serialises the exchange with compute, so it is for measurement runs only.
    """

    def __init__(self):
        self.seconds = 0.0

    def run(self, fn):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0


def _exchange(out, x, out_splits, in_splits, group, timer: ExchangeTimer | None) -> None:
    call = lambda: dist.all_to_all_single(out, x, out_splits, in_splits, group=group)  # noqa: E731
    timer.run(call) if timer is not None else call()


class _AllToAll(torch.autograd.Function):
    """Differentiable `all_to_all_single` with uneven splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, timer):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.timer = out_splits, in_splits, group, timer
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        _exchange(out, x.contiguous(), out_splits, in_splits, group, timer)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_in = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        _exchange(grad_in, grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group, ctx.timer)
        return grad_in, None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
               timer: ExchangeTimer | None = None) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group, timer)


def source_to_expert_major(counts_SJ: torch.Tensor) -> torch.Tensor:
    """Row permutation that regroups received rows from (source rank, local expert) blocks into
    (local expert, source rank) blocks, so each local expert's rows are contiguous."""
    sizes = counts_SJ.reshape(-1)
    starts_SJ = (torch.cumsum(sizes, 0) - sizes).view_as(counts_SJ)
    sizes_em, starts_em = counts_SJ.t().reshape(-1), starts_SJ.t().reshape(-1)
    offsets_em = torch.cumsum(sizes_em, 0) - sizes_em
    total = int(sizes.sum()) if sizes.numel() else 0
    within = torch.arange(total, device=counts_SJ.device) - torch.repeat_interleave(offsets_em, sizes_em, output_size=total)
    return torch.repeat_interleave(starts_em, sizes_em, output_size=total) + within


@dataclass
class _Exchange:
    in_splits: list[int]  # rows this rank sends to each EP rank
    out_splits: list[int]  # rows it receives from each
    unsort: torch.Tensor  # expert-major -> received (source-major) order


class AllToAllDispatcher:
    """Same contract as `LocalDispatcher`, with the experts spread over an EP group.

    dispatch: capacity and sort by global expert (= by destination rank) locally, exchange the
    counts per expert, then the token rows and their routing weights; regroup the received rows
    by local expert. combine: the reverse path, then the weighted rows are summed per token.
    """

    def __init__(self, group: dist.ProcessGroup, ep_size: int, num_local_experts: int,
                 timer: ExchangeTimer | None = None):
        self.group, self.ep, self.local = group, ep_size, num_local_experts
        self.timer = timer  # None: not timed (on CUDA timing would synchronise the stream)

    def exchange_seconds(self) -> float:
        if self.timer is None:
            return 0.0
        seconds, self.timer.seconds = self.timer.seconds, 0.0
        return seconds

    def dispatch(self, x_NC: torch.Tensor, routing: Routing, capacity: int | None, drop_policy: str) -> Dispatched:
        order, sizes_E = keep_order(routing, capacity, drop_policy)
        token_M = routing.token_A[order]
        send_SJ = sizes_E.view(self.ep, self.local)
        recv_SJ = torch.empty_like(send_SJ)
        _exchange(recv_SJ, send_SJ.contiguous(), None, None, self.group, self.timer)  # one row per rank
        # NOTE: host sync: the row counts size the exchange buffers.
        in_splits, out_splits = torch.stack([send_SJ.sum(1), recv_SJ.sum(1)]).cpu().tolist()
        x_recv = all_to_all(x_NC.index_select(0, token_M), out_splits, in_splits, self.group, self.timer)
        w_recv = all_to_all(routing.weight_A[order], out_splits, in_splits, self.group, self.timer)
        perm = source_to_expert_major(recv_SJ)
        return Dispatched(x_MC=x_recv.index_select(0, perm), group_sizes_E=recv_SJ.sum(0), token_M=token_M,
                          weight_M=w_recv.index_select(0, perm), dropped=routing.expert_A.numel() - sizes_E.sum(),
                          ctx=_Exchange(in_splits, out_splits, torch.argsort(perm)))

    def combine(self, y_MC: torch.Tensor, d: Dispatched, num_tokens: int) -> torch.Tensor:
        ex: _Exchange = d.ctx
        y_back = all_to_all(y_MC.index_select(0, ex.unsort), ex.in_splits, ex.out_splits, self.group, self.timer)
        return sum_by_token(y_back, d.token_M, num_tokens, d.x_MC.dtype)


class _Pending:
    """The async exchange between a `_StartExchange` and its `_WaitExchange` (both directions)."""

    def __init__(self, timer: ExchangeTimer | None):
        self.timer = timer
        self.work = self.grad_work = self.grad = None

    def wait(self, work) -> None:
        if self.timer is None:
            work.wait()
        else:
            self.timer.run(work.wait)  # the visible part of the exchange: the time spent blocked


class _StartExchange(torch.autograd.Function):
    """Starts `all_to_all_single` of x without waiting; returns the receive buffer, valid only
    after the matching `_WaitExchange`. Backward: waits for the reverse exchange that
    `_WaitExchange.backward` started."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, pending: _Pending):
        ctx.pending = pending
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        pending.work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, _grad_buffer):
        p: _Pending = ctx.pending
        p.wait(p.grad_work)
        grad, p.grad, p.grad_work = p.grad, None, None
        return grad, None, None, None, None


class _WaitExchange(torch.autograd.Function):
    """Waits for the exchange started by `_StartExchange`. Backward: starts the reverse exchange
    of the gradient without waiting (the autograd engine may run other chunks' backward meanwhile)."""

    @staticmethod
    def forward(ctx, buffer, out_splits: list[int], in_splits: list[int], group, pending: _Pending):
        ctx.splits, ctx.group, ctx.pending = (out_splits, in_splits), group, pending
        pending.wait(pending.work)
        pending.work = None
        return buffer.view_as(buffer)

    @staticmethod
    def backward(ctx, grad):
        (out_splits, in_splits), p = ctx.splits, ctx.pending
        p.grad = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        p.grad_work = dist.all_to_all_single(p.grad, grad.contiguous(), in_splits, out_splits, group=ctx.group,
                                             async_op=True)
        # What `_StartExchange.backward` receives is ignored: it returns the exchanged gradient.
        return grad, None, None, None, None


def _start(x, out_splits, in_splits, group, timer):
    pending = _Pending(timer)
    return _StartExchange.apply(x, out_splits, in_splits, group, pending), (out_splits, in_splits, group, pending)


def _wait(buffer, started):
    return _WaitExchange.apply(buffer, *started)


def chunk_counts(sizes_E: torch.Tensor, chunks: int) -> torch.Tensor:
    """[K, E] rows of each expert in each chunk: expert e's kept rows (in their kept order) cut
    into K near-equal consecutive pieces, piece i holding positions p with p*K // size == i."""
    i_K1 = torch.arange(chunks + 1, device=sizes_E.device)[:, None]
    edges = (i_K1 * sizes_E[None, :] + chunks - 1) // chunks  # ceil(i * size / K)
    return edges[1:] - edges[:-1]


class OverlappedAllToAllDispatcher(AllToAllDispatcher):
    """`parallel.ep_overlap_chunks` = K > 1: the exchange pipelined with the experts.

    Each expert's kept rows are cut into K pieces; chunk i is piece i of every expert. While chunk
    i+1's rows are in flight the experts compute chunk i, and chunk i's outputs travel back while
    chunk i+1 computes (Tutel's and Megatron's all-to-all/FFN overlap). The counts of every chunk
    go in one exchange, started before the rows are permuted. The layer calls
    `dispatch_compute_combine` instead of dispatch -> experts -> combine; the separate `dispatch`
    and `combine` (inherited, unchunked) remain for wrappers such as the tensor-parallel token
    splitter. Same rows through the same experts as the unchunked path: equal up to the order of
    each token's top-k sum.
    """

    def __init__(self, group, ep_size: int, num_local_experts: int, chunks: int, timer: ExchangeTimer | None = None):
        super().__init__(group, ep_size, num_local_experts, timer)
        self.chunks = chunks

    def dispatch_compute_combine(self, x_NC: torch.Tensor, routing: Routing, capacity: int | None, drop_policy: str,
                                 experts) -> tuple[torch.Tensor, torch.Tensor]:
        K, S, J = self.chunks, self.ep, self.local
        order, sizes_E = keep_order(routing, capacity, drop_policy)
        counts_KE = chunk_counts(sizes_E, K)
        send_SKJ = counts_KE.view(K, S, J).permute(1, 0, 2).contiguous()
        recv_SKJ = torch.empty_like(send_SKJ)
        counts_work = dist.all_to_all_single(recv_SKJ, send_SKJ, group=self.group, async_op=True)
        # While the counts travel: reorder the kept rows chunk-major (expert-sorted inside a chunk).
        expert_M = routing.expert_A[order]
        start_E = torch.cumsum(sizes_E, 0) - sizes_E
        pos_M = torch.arange(order.numel(), device=order.device) - start_E[expert_M]
        chunk_M = pos_M * K // sizes_E[expert_M].clamp(min=1)
        order = order[torch.argsort(chunk_M, stable=True)]
        token_M = routing.token_A[order]
        x_MC, w_M = x_NC.index_select(0, token_M), routing.weight_A[order]
        _Pending(self.timer).wait(counts_work)
        # NOTE: one host sync for all chunks: the row counts size the exchange buffers.
        in_KS, out_KS = torch.stack([send_SKJ.sum(2).t(), recv_SKJ.sum(2).t()]).cpu().tolist()
        offsets = [0]
        for row in in_KS:
            offsets.append(offsets[-1] + sum(row))

        def send(i):
            rows = slice(offsets[i], offsets[i + 1])
            return (_start(x_MC[rows], out_KS[i], in_KS[i], self.group, self.timer),
                    _start(w_M[rows], out_KS[i], in_KS[i], self.group, self.timer))

        in_flight, back = send(0), []
        for i in range(K):
            (xb, xs), (wb, ws) = in_flight
            if i + 1 < K:
                in_flight = send(i + 1)  # on the wire while chunk i computes
            x_recv, w_recv = _wait(xb, xs), _wait(wb, ws)
            perm = source_to_expert_major(recv_SKJ[:, i])
            y = experts(x_recv.index_select(0, perm), recv_SKJ[:, i].sum(0), w_recv.index_select(0, perm))
            back.append(_start(y.index_select(0, torch.argsort(perm)), in_KS[i], out_KS[i], self.group, self.timer))
        y_MC = torch.cat([_wait(b, started) for b, started in back])
        return sum_by_token(y_MC, token_M, x_NC.shape[0], x_NC.dtype), routing.expert_A.numel() - sizes_E.sum()


def apply_expert_parallel(model: nn.Module, groups: ProcessGroups, time_exchange: bool = False,
                          overlap_chunks: int = 1) -> nn.Module:
    """Keep this rank's slice of every MoE layer's experts and install the all-to-all dispatcher.

    Also tags every expert parameter with how its gradient is reduced (see reduce_expert_grads);
    with ep == 1 only the tags are set (experts are then reduced like everything else, by DDP
    in a data-parallel-only run). Under tensor parallelism the experts are whole on every TP rank,
    so their group (`groups.edp`) spans edp x tp ranks. `time_exchange`: the dispatchers time their
    exchanges (reported per step as `a2a_s`; CPU only, see ExchangeTimer). `overlap_chunks` > 1:
    the exchanges are chunked and overlapped with the experts (`OverlappedAllToAllDispatcher`).
    """
    if overlap_chunks < 1:
        raise ValueError(f"parallel.ep_overlap_chunks: must be >= 1, got {overlap_chunks}")
    dims = groups.dims
    ep_rank = dims.ep_rank(groups.rank)
    for layer in moe_layers(model):
        experts = layer.experts
        if dims.ep > 1:
            n = layer.cfg.num_experts // dims.ep
            keep = slice(ep_rank * n, (ep_rank + 1) * n)
            experts.w13 = nn.Parameter(experts.w13.detach()[keep].clone())
            experts.w2 = nn.Parameter(experts.w2.detach()[keep].clone())
            experts.num_experts, experts.expert_offset = n, ep_rank * n
            timer = ExchangeTimer() if time_exchange else None
            layer.dispatcher = (AllToAllDispatcher(groups.ep, dims.ep, n, timer) if overlap_chunks == 1 else
                                OverlappedAllToAllDispatcher(groups.ep, dims.ep, n, overlap_chunks, timer))
        for p in (experts.w13, experts.w2):
            # Reduced here rather than by DDP when sharded (EP) or when there is no DDP (TP, PP).
            p.expert_parallel = dims.ep > 1 or dims.tp > 1 or dims.pp > 1
            p.ep_group = groups.ep
            p.edp_group = groups.edp if dims.edp * dims.tp > 1 else None
            p.grad_divisor = dims.dp
            p.norm_copies = dims.edp * dims.tp  # ranks holding this same tensor (parallel.grads)
    return model


def expert_param_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if getattr(p, "expert_parallel", False)]


def reduce_expert_grads(model: nn.Module) -> None:
    """Expert gradients: summed over the expert-data-parallel group, divided by the dp size.

    Under EP each expert's gradient already holds the contributions of every rank of its EP group
    (the backward exchange brings them), so summing over the EDP group covers all ranks once; the
    division makes it the mean over ranks like the other parameters. Under TP each TP rank ran
    different tokens through the same experts, so the group also spans TP and the sum adds them.
    One all-reduce per group.
    """
    by_group: dict = {}
    for p in model.parameters():
        if getattr(p, "expert_parallel", False) and p.grad is not None:
            by_group.setdefault(id(p.edp_group), (p.edp_group, p.grad_divisor, []))[2].append(p.grad)
    for group, divisor, grads in by_group.values():
        if group is not None:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            for g, new in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(new)
        for g in grads:
            g.div_(divisor)
