"""Decoder-only transformer language model: RoPE, RMSNorm, SwiGLU, SDPA, optional local window.

Layers live in a `ModuleDict` keyed by index so that pipeline stages can be cut by deleting
modules without changing checkpoint keys; each block's `mlp` is a slot that the MoE layer fills.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from archs.common import (
    Attention,
    KVCache,
    PreNormBlock,
    RotaryLM,
    SwiGLU,
    check_heads,
    check_rope_scaling,
    init_weights,
    residual_scale,
)
from archs.ffn import active_matmul_params
from archs.registry import register


@dataclass
class TransformerConfig:
    arch: Annotated[str, "architecture family (registry key)"] = "transformer"
    vocab_size: Annotated[int | None, "vocabulary size; null takes it from the dataset's metadata"] = None
    max_seq_len: Annotated[int, "longest sequence the model accepts (RoPE table size)"] = 256
    d_model: Annotated[int, "model width"] = 256
    n_layers: Annotated[int, "number of transformer blocks"] = 4
    n_heads: Annotated[int, "attention heads; must divide d_model"] = 4
    n_kv_heads: Annotated[int | None, "key/value heads (grouped-query attention); null = n_heads"] = None
    d_ff: Annotated[int | None, "SwiGLU hidden width; null = 8/3 * d_model rounded up to a multiple of 64"] = None
    attn_window: Annotated[int | None, "local attention window (tokens each token sees, itself included); null = full causal"] = None
    rope_theta: Annotated[float, "RoPE base frequency"] = 10000.0
    rope_scaling: Annotated[dict | None, "RoPE frequency scaling: {type: linear, factor} or {type: llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}; null = none"] = None
    head_dim: Annotated[int | None, "attention head width; null = d_model / n_heads (Qwen3 sets it independently)"] = None
    attn_bias: Annotated[Literal["none", "qkv", "qkvo"], "biases of the attention projections: none, on q/k/v (Qwen2), or on q/k/v and the output (Llama attention_bias)"] = "none"
    qk_norm: Annotated[Literal["none", "head", "full"], "RMSNorm of queries and keys before RoPE: per head (Qwen3) or over the whole projection (OLMoE)"] = "none"
    norm_eps: Annotated[float, "RMSNorm epsilon"] = 1e-5
    tie_embeddings: Annotated[bool, "share the input embedding with the output head"] = True
    init_std: Annotated[float, "std of the normal weight init"] = 0.02

    def __post_init__(self):
        check_heads(self.d_model, self.n_heads, self.n_kv_heads, self.head_dim)
        check_rope_scaling(self.rope_scaling)
        for name in ("max_seq_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.attn_window is not None and self.attn_window < 1:
            raise ValueError(f"attn_window: must be >= 1 or null, got {self.attn_window}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {self.vocab_size}")

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        return self.d_ff or 64 * -(-(8 * self.d_model // 3) // 64)


def build_block(cfg: TransformerConfig, layer_id: int) -> PreNormBlock:
    attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.attn_window,
                     cfg.head_dim, cfg.attn_bias, cfg.qk_norm, cfg.norm_eps)
    return PreNormBlock(cfg.d_model, cfg.norm_eps, attn, SwiGLU(cfg.d_model, cfg.hidden), layer_id)


class Transformer(RotaryLM):
    def __init__(self, cfg: TransformerConfig):
        super().__init__(cfg, build_block, cfg.attn_head_dim, cfg.rope_scaling)
        init_weights(self, cfg.init_std, residual_scale(cfg.init_std, cfg.n_layers), ("wo", "w2"))

    def forward(self, tokens_BT: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        """tokens [B, T] (positions pos..pos+T-1) -> logits [B, T, vocab]."""
        self.check_length(pos, tokens_BT.shape[1])
        return self.run(tokens_BT, cache, pos)

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        cfg, p = self.cfg, self.embed.weight
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads or cfg.n_heads, max_len or cfg.max_seq_len,
                       cfg.attn_head_dim, dtype or p.dtype, p.device)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 * active matmul params + attention scores
        (families built on this one with MoE FFNs count each token's top_k experts only)."""
        cfg = self.cfg
        span = min(seq_len, cfg.attn_window or seq_len)
        return 6 * active_matmul_params(self) + 12 * cfg.n_layers * cfg.n_heads * cfg.attn_head_dim * span


PRESETS = {
    "debug": dict(max_seq_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64),
    "small": dict(max_seq_len=256, d_model=256, n_layers=4, n_heads=4),
}

register("transformer", TransformerConfig, Transformer, PRESETS)
