"""`blocksparse`: MegaBlocks' formulation in pure torch, so the GPU path's topology code runs on CPU.

The grouped product is one block-sparse matrix product. Each group is padded to a multiple of
the block size B (`padded_bins` = cumulative padded sizes, and a gather/scatter index map from
real rows to padded rows). The output, seen over the concatenated expert columns, is a
[P, G * O] matrix whose nonzero blocks are exactly (row block of group g) x (column blocks of
expert g): a block-CSR `Topology`. Forward is SDD (sampled dense-dense: only those blocks are
computed), backward computes dx over the row structure and dw over the transposed structure,
like `stk.ops.sdd` / `stk.ops.dsd` do on the GPU. Blocks are multiplied in chunks of batched
matmuls to bound the memory of the gathered operands.

Shape letters (beyond N, G, I, O): P padded rows, B block size, R = P / B block rows,
C = G * O / B column blocks, K nonzero blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.common import empty_result, host_sizes

BLOCK_SIZE = 128       # MegaBlocks' default blocking; tests lower it for tiny shapes
CHUNK_ELEMENTS = 1 << 23  # elements of one gathered operand per batched matmul (32 MiB in fp32)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None if dtype.is_floating_point else f"needs a floating dtype, got {dtype}"


@dataclass(frozen=True)
class Topology:
    """Padding maps and the block-CSR structure of the [P, G * O] output."""
    block_size: int
    num_groups: int
    d_out: int
    padded_bins_G: torch.Tensor     # cumulative padded group sizes (MegaBlocks' `padded_bins`)
    row_map_N: torch.Tensor         # padded row of each real row (gather/scatter index map)
    row_indices_K: torch.Tensor     # block row of each nonzero block, row-major order
    column_indices_K: torch.Tensor  # block column of each nonzero block
    offsets_R1: torch.Tensor        # CSR row pointers: blocks of row r are offsets[r]:offsets[r+1]
    column_indices_t_K: torch.Tensor  # transposed view: block row of each nonzero, column-major
    offsets_t_C1: torch.Tensor        # CSC column pointers
    block_offsets_t_K: torch.Tensor   # position in row-major order of each column-major nonzero

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.offsets_R1.numel() - 1) * self.block_size, self.num_groups * self.d_out

    @property
    def blocks_per_row(self) -> int:
        return self.d_out // self.block_size


def padded_index_map(sizes_G: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded_bins [G], row_map [N]): each group rounded up to a block multiple, and where each
    real row lands in the padded layout. Rows between a group's end and its padded end are zero."""
    sizes_G = sizes_G.to(torch.long)
    padded_G = (sizes_G + block_size - 1) // block_size * block_size
    bins_G = torch.cumsum(sizes_G, 0)
    padded_bins_G = torch.cumsum(padded_G, 0)
    num_rows = int(bins_G[-1]) if sizes_G.numel() else 0
    group_N = torch.repeat_interleave(torch.arange(sizes_G.numel(), device=sizes_G.device), sizes_G,
                                      output_size=num_rows)
    # row i of group g sits (i - start_g) rows after the padded start of g
    shift_G = (padded_bins_G - padded_G) - (bins_G - sizes_G)
    return padded_bins_G, torch.arange(num_rows, device=sizes_G.device) + shift_G[group_N]


def build_topology(sizes_G: torch.Tensor, block_size: int, d_out: int) -> Topology:
    """Block structure of the grouped product for group sizes [G], blocking B and width O.

    NOTE: host sync: the number of padded rows (and so of blocks) sizes the index tensors.
    """
    if block_size < 1 or d_out % block_size:
        raise ValueError(f"blocksparse: d_out={d_out} must be a multiple of block_size={block_size}")
    num_groups = sizes_G.numel()
    device = sizes_G.device
    padded_bins_G, row_map_N = padded_index_map(sizes_G, block_size)
    num_block_rows = int(padded_bins_G[-1]) // block_size
    per_row = d_out // block_size

    # Group of each block row, then its per_row column blocks: g * per_row + 0..per_row-1.
    group_R = torch.repeat_interleave(torch.arange(num_groups, device=device),
                                      torch.diff(padded_bins_G, prepend=padded_bins_G.new_zeros(1)) // block_size,
                                      output_size=num_block_rows)
    row_indices_K = torch.arange(num_block_rows, device=device).repeat_interleave(per_row)
    column_indices_K = (group_R[:, None] * per_row + torch.arange(per_row, device=device)).reshape(-1)
    offsets_R1 = torch.arange(0, num_block_rows * per_row + 1, per_row, device=device)

    # Transposed (column-major) view of the same nonzeros, as stk keeps for the backward.
    num_block_cols = num_groups * per_row
    order_K = torch.argsort(column_indices_K * max(num_block_rows, 1) + row_indices_K, stable=True)
    counts_C = torch.bincount(column_indices_K, minlength=num_block_cols)
    offsets_t_C1 = torch.cat([counts_C.new_zeros(1), torch.cumsum(counts_C, 0)])
    return Topology(block_size, num_groups, d_out, padded_bins_G, row_map_N, row_indices_K,
                    column_indices_K, offsets_R1, row_indices_K[order_K], offsets_t_C1, order_K)


def _chunks(total: int, per_item: int):
    step = max(1, CHUNK_ELEMENTS // max(per_item, 1))
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


def _row_chunks(topo: Topology, per_block: int):
    """Slices of whole block rows. Every row holds the same number of blocks (one expert's
    columns), so a row range is also a contiguous range of nonzeros: offsets[r0]:offsets[r1]."""
    per_row = max(topo.blocks_per_row, 1)
    yield from _chunks(topo.offsets_R1.numel() - 1, per_block * per_row)


def _column_blocks(w_GIO: torch.Tensor, block_size: int) -> torch.Tensor:
    """w [G, I, O] as its C column blocks [C, I, B] of the concatenated [I, G * O] matrix."""
    G, I, O = w_GIO.shape
    return w_GIO.reshape(G, I, O // block_size, block_size).permute(0, 2, 1, 3).reshape(-1, I, block_size)


class _SddBlocks(torch.autograd.Function):
    """Dense [P, O] result of the product restricted to the topology's nonzero blocks."""

    @staticmethod
    def forward(ctx, x_PI, w_GIO, topo: Topology):
        B, per_row = topo.block_size, topo.blocks_per_row
        x_RBI = x_PI.view(-1, B, x_PI.shape[1])
        w_CIB = _column_blocks(w_GIO, B)
        y_RJBB = x_PI.new_empty(x_RBI.shape[0], per_row, B, B)  # J = blocks per row
        for r in _row_chunks(topo, B * x_PI.shape[1]):
            k = slice(int(topo.offsets_R1[r.start]), int(topo.offsets_R1[r.stop]))
            rows, cols = topo.row_indices_K[k], topo.column_indices_K[k]
            y_RJBB[r] = torch.bmm(x_RBI[rows], w_CIB[cols]).view(-1, per_row, B, B)  # SDD on the blocks
        ctx.topo = topo
        ctx.save_for_backward(x_PI, w_GIO)
        return y_RJBB.transpose(1, 2).reshape(x_PI.shape[0], topo.d_out)

    @staticmethod
    def backward(ctx, dy_PO):
        x_PI, w_GIO = ctx.saved_tensors
        topo = ctx.topo
        B, per_row, I = topo.block_size, topo.blocks_per_row, x_PI.shape[1]
        dy_RJBB = dy_PO.reshape(-1, B, per_row, B).transpose(1, 2)
        x_RBI = x_PI.view(-1, B, I)
        w_CIB = _column_blocks(w_GIO, B)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dx: row structure; each block row sums its blocks' dy @ w_block^T (DSD).
            dx_RBI = torch.empty_like(x_RBI)
            for r in _row_chunks(topo, B * I):
                k = slice(int(topo.offsets_R1[r.start]), int(topo.offsets_R1[r.stop]))
                dy_KBB = dy_RJBB[r].reshape(-1, B, B)
                dx_KBI = torch.bmm(dy_KBB, w_CIB[topo.column_indices_K[k]].transpose(1, 2))
                dx_RBI[r] = dx_KBI.view(-1, per_row, B, I).sum(1)  # reduce each row's blocks
            dx = dx_RBI.view_as(x_PI)
        if ctx.needs_input_grad[1]:
            # dw: transposed structure; each column block sums x_block^T @ dy over its rows.
            dw_CIB = torch.zeros_like(w_CIB)
            col_of_t = torch.repeat_interleave(torch.arange(topo.offsets_t_C1.numel() - 1, device=x_PI.device),
                                               torch.diff(topo.offsets_t_C1),
                                               output_size=topo.block_offsets_t_K.numel())
            for s in _chunks(topo.block_offsets_t_K.numel(), B * I):
                rows, k = topo.column_indices_t_K[s], topo.block_offsets_t_K[s]
                dy_KBB = dy_RJBB[topo.row_indices_K[k], topo.column_indices_K[k] % per_row]
                dw_CIB.index_add_(0, col_of_t[s], torch.bmm(x_RBI[rows].transpose(1, 2), dy_KBB))
            G, _, O = w_GIO.shape
            dw = dw_CIB.view(G, per_row, I, B).permute(0, 2, 1, 3).reshape(G, I, O)
        return dx, dw, None


def blocksparse_mm(x_NI: torch.Tensor, w_GIO: torch.Tensor, sizes_G: torch.Tensor,
                   block_size: int | None = None) -> torch.Tensor:
    """x [N, I] sorted by group, w [G, I, O] -> [N, O]; O must be a multiple of block_size
    (default: the module's BLOCK_SIZE, read at call time)."""
    block_size = BLOCK_SIZE if block_size is None else block_size
    host_sizes(sizes_G, x_NI.shape[0])
    topo = build_topology(sizes_G.to(x_NI.device), block_size, w_GIO.shape[2])
    if x_NI.shape[0] == 0:
        return empty_result(x_NI, w_GIO)
    # NOTE: padding: each group grows to a block multiple (zero rows), as MegaBlocks' padded_gather.
    num_padded = int(topo.padded_bins_G[-1])
    x_PI = x_NI.new_zeros(num_padded, x_NI.shape[1]).index_copy(0, topo.row_map_N, x_NI)
    y_PO = _SddBlocks.apply(x_PI, w_GIO, topo)
    return y_PO.index_select(0, topo.row_map_N)  # padded_scatter: drop the padding rows
