"""`ParallelDims`: every parallel degree of a run, validated once, and the process groups it needs.

Layout: the mesh pp x dp x tp, tensor parallelism innermost (its ranks are neighbours: on GPUs
they share a node and its fast links), pipeline outermost:
  rank = (pp_rank * dp + dp_rank) * tp + tp_rank
  TP group:   ranks that differ only in tp_rank            sharded matmuls, all-reduces every block
  DP group:   ranks that differ only in dp_rank            gradients of replicated weights averaged
  PP group:   ranks that differ only in pp_rank            activations sent stage to stage
Expert parallelism is carved from dp: dp = ep * edp.
  EP group:   ep consecutive dp ranks (same pp, tp)        all-to-all token exchange
  expert group: the edp x tp ranks (same pp, same ep rank) that hold the same experts; expert
              gradients are summed over it (under TP each TP rank computes different tokens)
Every rank of an EP group reads different data (ep divides dp), so the exchange moves real work.
No global state: the groups live in a `ProcessGroups` object that is passed to who needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

# Families whose models `parallel.tensor_parallel` and `parallel.pipeline` know how to cut: an
# `embed`, a `ModuleDict` of blocks `layers` called as block(x, cos, sin), a final `norm`, an
# optional `head`, and attention/MLP submodules named attn.wq/wk/wv/wo and mlp.w1/w2/w3.
TP_PP_ARCHS = ("transformer", "moe_transformer", "deepseek_v3")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_ep(ep: int | str | None, dp: int, num_experts: int | None) -> int:
    """An EP degree from a number or the policy "auto": the largest divisor of both the
    data-parallel size and the number of experts (1 for a model without experts)."""
    if ep is None or num_experts is None:
        return 1 if ep in (None, "auto") else int(ep)
    if ep == "auto":
        return max(d for d in divisors(dp) if num_experts % d == 0)
    return int(ep)


@dataclass(frozen=True)
class ParallelDims:
    world: int
    dp: int
    ep: int = 1
    tp: int = 1
    pp: int = 1

    @staticmethod
    def build(world: int, ep: int | str | None = None, num_experts: int | None = None, *, tp: int = 1,
              pp: int = 1, dp: int | None = None, model_cfg: Any = None) -> "ParallelDims":
        """The layout of `world` ranks; `dp` null = what tp and pp leave. Raises ValueError naming the
        `parallel.*` field and listing the valid layouts for this world size."""
        if dp is not None and dp * tp * pp != world:
            raise ValueError(f"parallel.dp: {dp} != cluster.num_workers={world} / (parallel.tp={tp} x parallel.pp={pp}); "
                             f"{layouts_message(world, model_cfg)}")
        if dp is None:
            dp = world // (tp * pp) if world % (tp * pp) == 0 else 0
        dims = ParallelDims(world=world, dp=dp, ep=resolve_ep(ep, max(dp, 1), num_experts), tp=tp, pp=pp)
        dims.validate(num_experts, model_cfg)
        return dims

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    def validate(self, num_experts: int | None, model_cfg: Any = None) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.pp * self.dp * self.tp != self.world:
            raise ValueError(f"parallel: pp={self.pp} x dp={self.dp or '?'} x tp={self.tp} does not make the world "
                             f"size {self.world}; {layouts_message(self.world, model_cfg)}")
        if model_cfg is not None:
            problem = layout_problem(self.pp, self.tp, model_cfg)
            if problem:
                raise ValueError(f"{problem}; {layouts_message(self.world, model_cfg)}")
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
                                 f"valid with {self.dp} data-parallel ranks: {valid}, or 'auto'")

    # ---------------------------------------------------------------- coordinates of a rank
    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        return rank // (self.dp * self.tp), rank // self.tp % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def ep_rank(self, rank: int) -> int:
        return self.coords(rank)[1] % self.ep

    def ep_group_ranks(self, rank: int) -> list[int]:
        p, d, t = self.coords(rank)
        start = d - d % self.ep
        return [self.rank_of(p, j, t) for j in range(start, start + self.ep)]

    def edp_group_ranks(self, rank: int) -> list[int]:
        """Ranks that hold the same experts as `rank` (same stage and EP rank): edp x tp of them."""
        p, d, _ = self.coords(rank)
        return [self.rank_of(p, j, t) for j in range(d % self.ep, self.dp, self.ep) for t in range(self.tp)]

    def tp_group_ranks(self, rank: int) -> list[int]:
        p, d, _ = self.coords(rank)
        return [self.rank_of(p, d, t) for t in range(self.tp)]

    def dp_group_ranks(self, rank: int) -> list[int]:
        p, _, t = self.coords(rank)
        return [self.rank_of(p, j, t) for j in range(self.dp)]

    def pp_group_ranks(self, rank: int) -> list[int]:
        _, d, t = self.coords(rank)
        return [self.rank_of(j, d, t) for j in range(self.pp)]


def layout_problem(pp: int, tp: int, model_cfg: Any) -> str | None:
    """Why the model cannot be cut into `pp` stages and `tp` shards (None if it can)."""
    if pp == 1 and tp == 1:
        return None
    arch = getattr(model_cfg, "arch", None)
    if arch not in TP_PP_ARCHS:
        return (f"parallel.tp/pp: tensor and pipeline parallelism support model.arch {', '.join(TP_PP_ARCHS)}, "
                f"not {arch!r}; use parallel.tp=1 and parallel.pp=1")
    if pp > model_cfg.n_layers:
        return f"parallel.pp: {pp} stages need at least {pp} layers (model.n_layers={model_cfg.n_layers})"
    if tp > 1:
        sizes = {"model.n_heads": model_cfg.n_heads, "model.n_kv_heads": getattr(model_cfg, "n_kv_heads", None) or model_cfg.n_heads,
                 "model.d_ff (MLP hidden width)": model_cfg.hidden}
        moe = getattr(model_cfg, "moe", None)
        if moe is not None and moe.shared_expert_hidden:
            sizes["model.moe.shared_expert_hidden"] = moe.shared_expert_hidden
        for name, size in sizes.items():
            if size % tp:
                return f"parallel.tp: {tp} does not divide {name}={size}"
    return None


def valid_layouts(world: int, model_cfg: Any = None) -> list[tuple[int, int, int]]:
    """Every (pp, dp, tp) with pp x dp x tp = world that the model can hold."""
    out = []
    for pp in divisors(world):
        for tp in divisors(world // pp):
            if model_cfg is None or layout_problem(pp, tp, model_cfg) is None:
                out.append((pp, world // (pp * tp), tp))
    return out


def layouts_message(world: int, model_cfg: Any = None) -> str:
    shown = ", ".join(f"pp={p} x dp={d} x tp={t}" for p, d, t in valid_layouts(world, model_cfg))
    return f"valid layouts for {world} worker(s): {shown}"


@dataclass
class ProcessGroups:
    """The groups of one rank. `None` means "no group needed" (size 1), or for `ep`/`edp` in a
    data-parallel-only run, see `build_groups`."""

    dims: ParallelDims
    rank: int
    ep: dist.ProcessGroup | None
    edp: dist.ProcessGroup | None
    tp: dist.ProcessGroup | None = None
    dp: dist.ProcessGroup | None = None
    pp: dist.ProcessGroup | None = None
    embed: dist.ProcessGroup | None = None  # first and last stage: the tied embedding's two copies
    # The root DeviceMesh (pp, dp_replicate, dp_shard, tp) when FSDP runs (parallel.fsdp): tensor
    # parallelism then takes its "tp" slice so that FSDP's and TP's DTensors share one root.
    device_mesh: Any = None

    @property
    def coords(self) -> tuple[int, int, int]:
        return self.dims.coords(self.rank)


def _new_groups(all_groups: list[list[int]], mine: list[int]) -> dist.ProcessGroup | None:
    """Create every group of a family (all ranks must call new_group for each, in the same
    order) and return the one that holds this rank; None for groups of one rank."""
    found = None
    for ranks in sorted({tuple(g) for g in all_groups}):
        if len(ranks) < 2:
            continue
        group = dist.new_group(list(ranks))
        if list(ranks) == mine:
            found = group
    return found


def build_groups(dims: ParallelDims, rank: int) -> ProcessGroups:
    """Create the groups this layout needs (every rank must call this, in the same order).

    A data-parallel-only run (tp = pp = 1) creates only the EP and expert groups, as before:
    its data-parallel group is the default (world) group.
    """
    everyone = range(dims.world)
    groups = ProcessGroups(dims=dims, rank=rank, ep=None, edp=None)
    if dims.ep > 1:
        groups.ep = _new_groups([dims.ep_group_ranks(r) for r in everyone], dims.ep_group_ranks(rank))
        groups.edp = _new_groups([dims.edp_group_ranks(r) for r in everyone], dims.edp_group_ranks(rank))
    if dims.tp == 1 and dims.pp == 1:
        return groups
    if dims.ep == 1:  # experts are shared by every dp x tp rank of a stage
        groups.edp = _new_groups([dims.edp_group_ranks(r) for r in everyone], dims.edp_group_ranks(rank))
    groups.tp = _new_groups([dims.tp_group_ranks(r) for r in everyone], dims.tp_group_ranks(rank))
    groups.dp = _new_groups([dims.dp_group_ranks(r) for r in everyone], dims.dp_group_ranks(rank))
    groups.pp = _new_groups([dims.pp_group_ranks(r) for r in everyone], dims.pp_group_ranks(rank))
    if dims.pp > 1:
        def ends(r):
            ranks = dims.pp_group_ranks(r)
            return [ranks[0], ranks[-1]]
        groups.embed = _new_groups([ends(r) for r in everyone], ends(rank))
    return groups
