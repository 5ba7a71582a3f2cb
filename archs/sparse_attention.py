"""Sparse causal attention with three patterns, and the transformer family built on it.

Every pattern is computed per query block over a gathered set of key positions: scores are
[blocks, block_size, S] for S keys per query block, so time and memory grow as T * S, never
T x T. The patterns differ only in which key positions each query block gathers:

- blockwise: block b sees key blocks b - prev_blocks .. b (causal inside its own block).
- local_global: token t sees keys (t - window, t] and the first `global_tokens` positions.
  Global tokens made causal: they are the first g positions of the sequence, visible to every
  later token (BigBird's global columns); their own rows need nothing extra, as everything they
  may see lies before them. Tiled by blocks, each query block gathers the blocks its window can
  reach plus the g global keys not already among them, so every key is counted once.
- learned: block b sees its own block and the `top_blocks` earlier blocks with the highest score
  s(b, c) = q[b * block] . mean(k over block c) / sqrt(D) (rotated queries and keys: the mean
  logit that the block's first query gives block c; block selection as in MoBA/NSA). The first
  query of a block is known when the block starts and blocks c < b are complete by then, so the
  choice is causal and identical at decoding. top-k itself has no gradient: the scorer is trained
  through a gate, logsigmoid(s(b, c)) added to the logits of block c's keys (block c's attention
  weight scaled by sigmoid(s), then renormalised), so the loss reaches s and, through it, the
  query and key projections that form it.

Shape letters as in archs/common.py, plus N query blocks, Q queries per block, S gathered keys per
query block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from archs.common import (
    Attention,
    KVCache,
    PreNormBlock,
    RotaryLM,
    apply_rope,
    check_heads,
    init_weights,
    residual_scale,
)
from archs.ffn import MoEOptions, active_matmul_params, check_causal_routing, make_ffn
from archs.registry import register

PATTERNS = ("blockwise", "local_global", "learned")


@dataclass(frozen=True)
class SparsePattern:
    """Which keys each query block gathers (plain values; built from the family config)."""
    kind: str
    block_size: int
    prev_blocks: int = 1
    window: int = 1
    global_tokens: int = 0
    top_blocks: int = 1

    @property
    def local_blocks(self) -> int:
        """Earlier blocks a local_global query block must gather to cover its window."""
        return -(-(self.window - 1) // self.block_size)

    @property
    def keys_per_query(self) -> int:
        """S: keys gathered per query block (the cost per query)."""
        if self.kind == "blockwise":
            return (self.prev_blocks + 1) * self.block_size
        if self.kind == "local_global":
            return (self.local_blocks + 1) * self.block_size + self.global_tokens
        return (self.top_blocks + 1) * self.block_size


# ------------------------------------------------------------------- key positions per pattern

def _block_span(blocks_N: torch.Tensor, block: int, before: int) -> torch.Tensor:
    """Positions of blocks b-before .. b for each query block b: [N, (before+1)*block], -1 below 0."""
    c_NJ = blocks_N[:, None] - torch.arange(before, -1, -1, device=blocks_N.device)
    pos = (c_NJ[:, :, None] * block + torch.arange(block, device=blocks_N.device)).flatten(1)
    return pos.masked_fill(pos < 0, -1)


def blockwise_positions(blocks_N: torch.Tensor, p: SparsePattern) -> torch.Tensor:
    return _block_span(blocks_N, p.block_size, p.prev_blocks)


def local_global_positions(blocks_N: torch.Tensor, p: SparsePattern) -> torch.Tensor:
    local = _block_span(blocks_N, p.block_size, p.local_blocks)
    g = torch.arange(p.global_tokens, device=blocks_N.device).expand(len(blocks_N), -1)
    first_local = (blocks_N[:, None] - p.local_blocks) * p.block_size
    glob = g.masked_fill(g >= first_local, -1)  # already gathered with the local blocks
    return torch.cat([glob, local], dim=1)


def learned_positions(q_first_BHND: torch.Tensor, k_mean_BHCD: torch.Tensor, blocks_N: torch.Tensor,
                      p: SparsePattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Own block + top-scoring earlier blocks. q_first: each query block's first (rotated) query;
    k_mean: mean rotated key of each complete block 0..C-1. Returns positions [B, H, N, S] and the
    gate bias [B, H, N, S] (differentiable: the scorer's gradient path)."""
    B, H, N, D = q_first_BHND.shape
    C, bs = k_mean_BHCD.shape[2], p.block_size
    own = _block_span(blocks_N, bs, 0).expand(B, H, N, bs)
    top = min(p.top_blocks, C)
    if top == 0:
        return own, torch.zeros(own.shape, dtype=q_first_BHND.dtype, device=own.device)
    score_BHNC = q_first_BHND @ k_mean_BHCD.transpose(-1, -2) / math.sqrt(D)
    earlier_NC = torch.arange(C, device=blocks_N.device) < blocks_N[:, None]
    score_BHNC = score_BHNC.masked_fill(~earlier_NC, float("-inf"))
    val, idx = score_BHNC.topk(top, dim=-1)  # [B, H, N, top]
    chosen = torch.isfinite(val)  # fewer than `top` earlier blocks: the rest are padding
    gate = F.logsigmoid(val.masked_fill(~chosen, 0.0)).masked_fill(~chosen, 0.0)
    pos = idx[..., None] * bs + torch.arange(bs, device=idx.device)
    pos = pos.masked_fill(~chosen[..., None], -1).flatten(3)
    bias = gate[..., None].expand(B, H, N, top, bs).flatten(3)
    return torch.cat([pos, own], dim=-1), torch.cat([bias, torch.zeros_like(own, dtype=bias.dtype)], dim=-1)


# ------------------------------------------------------------------------------ the attention

def gathered_attention(q_BHNQD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, qpos_NQ: torch.Tensor,
                       kpos: torch.Tensor, bias: torch.Tensor | None = None, window: int | None = None,
                       global_tokens: int = 0) -> torch.Tensor:
    """Each query block attends to the keys at its gathered positions: [B, H, N, Q, D].

    kpos: [N, S] (shared by batch and heads) or [B, H, N, S]; -1 (and positions past the keys
    held) mean no key. A key is allowed if it exists, is not after the query, and (with `window`)
    lies in the query's window or among the first `global_tokens` positions. `bias` [.., N, S] is
    added to the logits. The largest tensors are [B, H, N, Q, S]: O(T * S), never O(T^2).
    """
    B, H, N, Q, D = q_BHNQD.shape
    S_keys = k_BHSD.shape[2]
    kpos = kpos.masked_fill(kpos >= S_keys, -1)
    idx = kpos.clamp(min=0)
    if idx.dim() == 2:  # shared positions: plain indexing along the sequence dimension
        k_g, v_g = (t[:, :, idx.flatten()].view(B, H, N, -1, D) for t in (k_BHSD, v_BHSD))
    else:  # per batch row and head: index the flattened (B*H) rows
        rows = torch.arange(B * H, device=idx.device)[:, None]
        flat = idx.reshape(B * H, -1)
        k_g, v_g = (t.reshape(B * H, S_keys, D)[rows, flat].view(B, H, N, -1, D) for t in (k_BHSD, v_BHSD))
    kp = kpos[..., None, :]  # [.., N, 1, S]
    # NOTE: padding queries past the last key act as the last real query, so no row is empty.
    qp = qpos_NQ.clamp(max=S_keys - 1)[:, :, None]  # [N, Q, 1]
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed = allowed & ((qp - kp < window) | (kp < global_tokens))
    logits = (q_BHNQD @ k_g.transpose(-1, -2)) * (1.0 / math.sqrt(D))
    if bias is not None:
        logits = logits + bias[..., None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits.float(), dim=-1).to(v_g.dtype) @ v_g


def sparse_attention(q_BHTD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, p: SparsePattern,
                     pos: int = 0, q_first_BHND: torch.Tensor | None = None,
                     k_mean_BHCD: torch.Tensor | None = None) -> torch.Tensor:
    """Queries at positions [pos, pos+T) over keys at [0, S) (S >= pos+T): [B, H, T, D].

    Query blocks are aligned to absolute positions (multiples of block_size), so a decoding step
    computes exactly what the full forward computes for that query. For `learned`, q_first and
    k_mean default to those of a full sequence (pos = 0); decoding passes them from its cache.
    """
    B, H, T, D = q_BHTD.shape
    bs = p.block_size
    if T == 1:  # one decoding step: a block of one query
        blocks = torch.tensor([pos // bs], device=q_BHTD.device)
        q_BHNQD, qpos, left = q_BHTD[:, :, None], torch.tensor([[pos]], device=q_BHTD.device), 0
    else:
        b0, b1 = pos // bs, (pos + T - 1) // bs + 1
        left = pos - b0 * bs
        # NOTE: padded queries sit in the blocks' unused slots; they see real keys and are dropped.
        q_pad = F.pad(q_BHTD, (0, 0, left, (b1 - b0) * bs - left - T))
        q_BHNQD = q_pad.view(B, H, b1 - b0, bs, D)
        blocks = torch.arange(b0, b1, device=q_BHTD.device)
        qpos = (blocks[:, None] * bs + torch.arange(bs, device=q_BHTD.device))
    bias, window = None, None
    if p.kind == "blockwise":
        kpos = blockwise_positions(blocks, p)
    elif p.kind == "local_global":
        kpos, window = local_global_positions(blocks, p), p.window
    else:
        if q_first_BHND is None:
            if pos:
                raise ValueError("learned sparse attention at pos > 0 needs q_first/k_mean from the cache")
            q_first_BHND = q_BHTD[:, :, ::bs]
            k_mean_BHCD = block_means(k_BHSD, bs)
        kpos, bias = learned_positions(q_first_BHND, k_mean_BHCD, blocks, p)
    out = gathered_attention(q_BHNQD, k_BHSD, v_BHSD, qpos, kpos, bias, window, p.global_tokens)
    return out.flatten(2, 3)[:, :, left:left + T]


def block_means(k_BHSD: torch.Tensor, block: int) -> torch.Tensor:
    """Mean key of every complete block: [B, H, S // block, D]."""
    B, H, S, D = k_BHSD.shape
    n = S // block
    return k_BHSD[:, :, :n * block].view(B, H, n, block, D).mean(3)


class SparseKVCache(KVCache):
    """KV cache plus, for `learned`, each block's first query and each complete block's mean key."""

    def __init__(self, n_layers, batch, n_heads, n_kv_heads, max_len, head_dim, block_size, learned, dtype, device):
        super().__init__(n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device)
        n_blocks = -(-max_len // block_size)
        shape = (n_layers, batch, n_heads, n_blocks, head_dim) if learned else (0,)
        self.q_first = torch.zeros(shape, dtype=dtype, device=device)
        self.k_mean = torch.zeros(shape, dtype=dtype, device=device)


class SparseAttention(Attention):
    """Multi-head causal attention with RoPE and grouped KV heads over a sparse pattern."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, pattern: SparsePattern):
        super().__init__(d_model, n_heads, n_kv_heads)
        self.pattern = pattern

    def forward(self, x_BTC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: SparseKVCache | None = None, layer: int = 0, pos: int = 0) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        q = self.wq(x_BTC).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTC).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTC).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, pos, k, v)
        elif pos:
            raise ValueError("pos > 0 needs the cache that holds positions [0, pos)")
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        q_first = k_mean = None
        if cache is not None and self.pattern.kind == "learned":
            q_first, k_mean = self._block_summaries(q, k, cache, layer, pos)
        out = sparse_attention(q, k, v, self.pattern, pos, q_first, k_mean)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def _block_summaries(self, q_BHTD, k_BHSD, cache: SparseKVCache, layer: int, pos: int):
        """Record first queries of blocks starting and mean keys of blocks completing in
        [pos, pos+T); return those of the query blocks touched and of every complete block."""
        bs, T = self.pattern.block_size, q_BHTD.shape[2]
        b0, b1 = -(-pos // bs), (pos + T - 1) // bs + 1  # blocks whose first position is in this call
        if b1 > b0:
            cache.q_first[layer, :, :, b0:b1] = q_BHTD[:, :, b0 * bs - pos::bs]
        c0, done = pos // bs, (pos + T) // bs  # blocks completed by this call
        if done > c0:
            cache.k_mean[layer, :, :, c0:done] = block_means(k_BHSD[:, :, c0 * bs:done * bs], bs)
        return cache.q_first[layer, :, :, pos // bs:b1], cache.k_mean[layer, :, :, :done]


# ---------------------------------------------------------------------------------- the family

@dataclass
class SparseTransformerConfig(MoEOptions):
    arch: Annotated[str, "architecture family (registry key)"] = "sparse_transformer"
    vocab_size: Annotated[int | None, "vocabulary size; null takes it from the dataset's metadata"] = None
    max_seq_len: Annotated[int, "longest sequence the model accepts (RoPE table size)"] = 256
    d_model: Annotated[int, "model width"] = 256
    n_layers: Annotated[int, "number of transformer blocks"] = 4
    n_heads: Annotated[int, "attention heads; must divide d_model"] = 4
    n_kv_heads: Annotated[int | None, "key/value heads (grouped-query attention); null = n_heads"] = None
    d_ff: Annotated[int | None, "SwiGLU hidden width; null = 8/3 * d_model rounded up to a multiple of 64"] = None
    pattern: Annotated[Literal["blockwise", "local_global", "learned"], "sparse attention pattern"] = "blockwise"
    block_size: Annotated[int, "query/key block length (every pattern computes per query block)"] = 32
    prev_blocks: Annotated[int, "blockwise: earlier blocks each block sees besides itself"] = 2
    window: Annotated[int, "local_global: tokens each token sees in its sliding window, itself included"] = 64
    global_tokens: Annotated[int, "local_global: the first g positions, visible to every later token"] = 4
    top_blocks: Annotated[int, "learned: earlier blocks each block selects besides itself"] = 2
    rope_theta: Annotated[float, "RoPE base frequency"] = 10000.0
    norm_eps: Annotated[float, "RMSNorm epsilon"] = 1e-5
    tie_embeddings: Annotated[bool, "share the input embedding with the output head"] = True
    init_std: Annotated[float, "std of the normal weight init"] = 0.02

    def __post_init__(self):
        check_heads(self.d_model, self.n_heads, self.n_kv_heads)
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern: {self.pattern!r} is not one of {', '.join(map(repr, PATTERNS))}")
        for name in ("max_seq_len", "d_model", "n_layers", "n_heads", "block_size", "window", "top_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("prev_blocks", "global_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {self.vocab_size}")
        self.check_moe(self.n_layers)

    @property
    def hidden(self) -> int:
        return self.d_ff or 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def sparse_pattern(self) -> SparsePattern:
        return SparsePattern(self.pattern, self.block_size, self.prev_blocks, self.window, self.global_tokens,
                             self.top_blocks)


def build_block(cfg: SparseTransformerConfig, layer_id: int) -> PreNormBlock:
    attn = SparseAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.sparse_pattern)
    mlp = make_ffn(cfg.d_model, cfg.hidden, cfg, layer_id, cfg.init_std, residual_scale(cfg.init_std, cfg.n_layers))
    return PreNormBlock(cfg.d_model, cfg.norm_eps, attn, mlp, layer_id)


class SparseTransformer(RotaryLM):
    def __init__(self, cfg: SparseTransformerConfig):
        super().__init__(cfg, build_block, cfg.d_model // cfg.n_heads)
        init_weights(self, cfg.init_std, residual_scale(cfg.init_std, cfg.n_layers), ("wo", "w2"))

    def forward(self, tokens_BT: torch.Tensor, cache: SparseKVCache | None = None, pos: int = 0) -> torch.Tensor:
        """tokens [B, T] (positions pos..pos+T-1) -> logits [B, T, vocab]."""
        self.check_length(pos, tokens_BT.shape[1])
        return self.run(tokens_BT, cache, pos)

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> SparseKVCache:
        cfg, p = self.cfg, self.embed.weight
        check_causal_routing(cfg.moe)
        return SparseKVCache(cfg.n_layers, batch, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads,
                             max_len or cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.block_size,
                             cfg.pattern == "learned", dtype or p.dtype, p.device)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * active matmul params + attention over the gathered keys."""
        cfg = self.cfg
        span = min(seq_len, cfg.sparse_pattern.keys_per_query)
        return 6 * active_matmul_params(self) + 12 * cfg.n_layers * cfg.d_model * span


PRESETS = {
    "debug": dict(max_seq_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, block_size=8, prev_blocks=2,
                  window=12, global_tokens=2, top_blocks=2),
    "small": dict(max_seq_len=256, d_model=256, n_layers=4, n_heads=4, block_size=32, prev_blocks=2,
                  window=64, global_tokens=4, top_blocks=2),
}

register("sparse_transformer", SparseTransformerConfig, SparseTransformer, PRESETS)
