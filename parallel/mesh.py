"""`ParallelDims`: every parallel degree of a run, validated once, and the process groups it needs.

Layout (ranks are numbered consecutively inside an expert-parallel group):
  world = dp                       (tensor and pipeline parallelism are not implemented yet)
  dp    = ep * edp                 ep ranks split the experts; edp ranks hold the same experts
  EP group g:  ranks [g*ep, (g+1)*ep)        all-to-all token exchange
  EDP group j: ranks {j, j+ep, j+2ep, ...}   expert gradients are reduced here
Every rank of an EP group reads different data (ep divides dp), so the exchange moves real work.
No global state: the groups live in a `ProcessGroups` object that is passed to who needs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_ep(ep: int | str | None, world: int, num_experts: int | None) -> int:
    """An EP degree from a number or the policy "auto": the largest divisor of both the
    data-parallel size and the number of experts (1 for a model without experts)."""
    if ep is None or num_experts is None:
        return 1 if ep in (None, "auto") else int(ep)
    if ep == "auto":
        return max(d for d in divisors(world) if num_experts % d == 0)
    return int(ep)


@dataclass(frozen=True)
class ParallelDims:
    world: int
    dp: int
    ep: int = 1

    @staticmethod
    def build(world: int, ep: int | str | None = None, num_experts: int | None = None) -> "ParallelDims":
        dims = ParallelDims(world=world, dp=world, ep=resolve_ep(ep, world, num_experts))
        dims.validate(num_experts)
        return dims

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    def validate(self, num_experts: int | None) -> None:
        if self.dp != self.world:
            raise ValueError(f"parallel.dp: {self.dp} != world size {self.world} (tensor/pipeline parallelism "
                             "are not implemented, so every worker is a data-parallel rank)")
        if self.ep < 1 or self.dp % self.ep:
            valid = ", ".join(map(str, divisors(self.dp)))
            raise ValueError(f"parallel.ep: {self.ep} does not divide the data-parallel size {self.dp}; "
                             f"valid: {valid}, or 'auto'")
        if self.ep > 1:
            if num_experts is None:
                raise ValueError(f"parallel.ep: {self.ep} needs a model with MoE layers (model.arch: moe_transformer)")
            if num_experts % self.ep:
                valid = ", ".join(str(d) for d in divisors(self.dp) if num_experts % d == 0)
                raise ValueError(f"parallel.ep: {self.ep} does not divide model.moe.num_experts={num_experts}; "
                                 f"valid with {self.dp} workers: {valid}, or 'auto'")

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep

    def ep_group_ranks(self, rank: int) -> list[int]:
        start = rank - rank % self.ep
        return list(range(start, start + self.ep))

    def edp_group_ranks(self, rank: int) -> list[int]:
        return list(range(rank % self.ep, self.world, self.ep))


@dataclass
class ProcessGroups:
    """The groups of one rank. `None` means the default (world) group."""

    dims: ParallelDims
    rank: int
    ep: dist.ProcessGroup | None
    edp: dist.ProcessGroup | None


def build_groups(dims: ParallelDims, rank: int) -> ProcessGroups:
    """Create the EP and EDP groups (every rank must call this, in the same order)."""
    ep_groups = {}
    edp_groups = {}
    if dims.ep > 1:
        for start in range(0, dims.world, dims.ep):
            ranks = list(range(start, start + dims.ep))
            ep_groups[tuple(ranks)] = dist.new_group(ranks)
    if dims.ep > 1 and dims.edp > 1:
        for j in range(dims.ep):
            ranks = list(range(j, dims.world, dims.ep))
            edp_groups[tuple(ranks)] = dist.new_group(ranks)
    return ProcessGroups(dims=dims, rank=rank, ep=ep_groups.get(tuple(dims.ep_group_ranks(rank))),
                         edp=edp_groups.get(tuple(dims.edp_group_ranks(rank))))
