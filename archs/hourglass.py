"""Hourglass transformer (Nawrot et al., "Hierarchical Transformers Are More Efficient Language
Models"): full-resolution layers at the bottom and top, a middle that runs on a sequence k times
shorter.

    x = pre layers(embed(tokens))          full resolution
    z = pool(shift_right(x, k - 1))        shortened position j summarises x[jk-k+1 .. jk]
    u = mid layers(z) - z                  what the middle adds to the residual stream
    x = x + upsample(u)                    position t receives u[t // k] (the bottom's residual link)
    logits = head(post layers(x))          full resolution

Causality: u[j] depends on x[<= jk] and reaches positions jk .. jk+k-1 only. Without the shift
the group of position jk would contain x[jk+k-1], a future token for it.

The middle's update (its output minus its input) is what gets upsampled, so the residual stream
keeps one scale and with k = 1 the model is exactly the plain stack of its layers (a test holds
it to that against the dense transformer with the same weights).

Shape letters as in archs/common.py; J shortened length, K shortening factor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from archs.common import (
    Attention,
    KVCache,
    PreNormBlock,
    RMSNorm,
    check_heads,
    check_sequence_length,
    init_weights,
    residual_scale,
    rope_tables,
)
from archs.ffn import MoEOptions, active_matmul_params, check_causal_routing, make_ffn
from archs.registry import register


@dataclass
class HourglassConfig(MoEOptions):
    arch: Annotated[str, "architecture family (registry key)"] = "hourglass"
    vocab_size: Annotated[int | None, "vocabulary size; null takes it from the dataset's metadata"] = None
    max_seq_len: Annotated[int, "longest sequence the model accepts (RoPE table size)"] = 256
    d_model: Annotated[int, "model width (the same at every resolution)"] = 256
    n_heads: Annotated[int, "attention heads; must divide d_model"] = 4
    n_kv_heads: Annotated[int | None, "key/value heads (grouped-query attention); null = n_heads"] = None
    d_ff: Annotated[int | None, "SwiGLU hidden width; null = 8/3 * d_model rounded up to a multiple of 64"] = None
    n_pre_layers: Annotated[int, "full-resolution layers before shortening"] = 1
    n_mid_layers: Annotated[int, "layers on the shortened sequence"] = 2
    n_post_layers: Annotated[int, "full-resolution layers after upsampling"] = 1
    shorten_factor: Annotated[int, "k: the middle sees one position per k tokens (1 = a plain stack)"] = 2
    pool: Annotated[Literal["mean", "linear"], "shortening: mean of k vectors, or a learned linear map of their concatenation (starts as the mean)"] = "linear"
    upsample: Annotated[Literal["repeat", "linear"], "upsampling: repeat each update k times, or a learned map to k vectors (starts as repeat)"] = "linear"
    rope_theta: Annotated[float, "RoPE base frequency"] = 10000.0
    norm_eps: Annotated[float, "RMSNorm epsilon"] = 1e-5
    tie_embeddings: Annotated[bool, "share the input embedding with the output head"] = True
    init_std: Annotated[float, "std of the normal weight init"] = 0.02

    def __post_init__(self):
        check_heads(self.d_model, self.n_heads, self.n_kv_heads)
        for name in ("max_seq_len", "d_model", "n_heads", "n_mid_layers", "shorten_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("n_pre_layers", "n_post_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.pool not in ("mean", "linear"):
            raise ValueError(f"pool: {self.pool!r} is not one of 'mean', 'linear'")
        if self.upsample not in ("repeat", "linear"):
            raise ValueError(f"upsample: {self.upsample!r} is not one of 'repeat', 'linear'")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {self.vocab_size}")
        self.check_moe(self.n_layers)

    @property
    def n_layers(self) -> int:
        """All blocks; also the number of FFN slots (bottom, then middle, then top)."""
        return self.n_pre_layers + self.n_mid_layers + self.n_post_layers

    @property
    def hidden(self) -> int:
        return self.d_ff or 64 * -(-(8 * self.d_model // 3) // 64)


def build_block(cfg: HourglassConfig, slot: int, cache_slot: int) -> PreNormBlock:
    """Pre-norm attention + FFN; `slot` is its global FFN slot, `cache_slot` its layer in its KV cache."""
    attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads)
    mlp = make_ffn(cfg.d_model, cfg.hidden, cfg, slot, cfg.init_std, residual_scale(cfg.init_std, cfg.n_layers))
    return PreNormBlock(cfg.d_model, cfg.norm_eps, attn, mlp, cache_slot)


class HourglassCache:
    """Decoding state: KV caches of both resolutions, the bottom's outputs, the upsampled updates.

    A shortened position j completes when token jk arrives; the middle then runs on it once and
    its upsampled update serves tokens jk .. jk+k-1.
    """

    def __init__(self, cfg: HourglassConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        k, D = cfg.shorten_factor, cfg.d_model // cfg.n_heads
        kv, short = cfg.n_kv_heads or cfg.n_heads, -(-max_len // k)
        self.full = KVCache(cfg.n_pre_layers + cfg.n_post_layers, batch, kv, max_len, D, dtype, device)
        self.mid = KVCache(cfg.n_mid_layers, batch, kv, short, D, dtype, device)
        # NOTE: k-1 zero rows in front: the shift right that keeps shortening causal.
        self.bottom = torch.zeros(batch, k - 1 + max_len, cfg.d_model, dtype=dtype, device=device)
        self.update = torch.zeros(batch, short * k, cfg.d_model, dtype=dtype, device=device)
        self.max_len = max_len


class Hourglass(nn.Module):
    def __init__(self, cfg: HourglassConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is null: set it, or build through the job config, which takes it from the data")
        self.cfg = cfg
        k, C = cfg.shorten_factor, cfg.d_model
        n_pre, n_mid = cfg.n_pre_layers, cfg.n_mid_layers
        self.pre_ids = [str(i) for i in range(n_pre)]
        self.mid_ids = [str(i) for i in range(n_pre, n_pre + n_mid)]
        self.post_ids = [str(i) for i in range(n_pre + n_mid, cfg.n_layers)]
        self.embed = nn.Embedding(cfg.vocab_size, C)
        # One ModuleDict of all blocks keyed by global index (bottom, middle, top): checkpoint keys
        # match the dense transformer's, and activation checkpointing wraps every block.
        # Cache slots: bottom and top share the full-resolution cache, the middle has its own.
        cache_slot = {i: i - n_pre if n_pre <= i < n_pre + n_mid else i if i < n_pre else i - n_mid
                      for i in range(cfg.n_layers)}
        self.layers = nn.ModuleDict({str(i): build_block(cfg, i, cache_slot[i]) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(C, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(C, cfg.vocab_size, bias=False)
        self.pool = nn.Linear(k * C, C, bias=False) if k > 1 and cfg.pool == "linear" else None
        self.up = nn.Linear(C, k * C, bias=False) if k > 1 and cfg.upsample == "linear" else None
        cos, sin = rope_tables(cfg.max_seq_len, C // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, cfg.init_std, residual_scale(cfg.init_std, cfg.n_layers), ("wo", "w2"))
        with torch.no_grad():  # start as mean pooling / repetition; learning moves them from there
            eye = torch.eye(C)
            if self.pool is not None:
                self.pool.weight.copy_(torch.cat([eye / k] * k, dim=1))
            if self.up is not None:
                self.up.weight.copy_(torch.cat([eye] * k, dim=0))

    def forward(self, tokens_BT: torch.Tensor, cache: HourglassCache | None = None, pos: int = 0) -> torch.Tensor:
        """tokens [B, T] (positions pos..pos+T-1) -> logits [B, T, vocab]."""
        T = tokens_BT.shape[1]
        check_sequence_length(pos, T, self.cfg.max_seq_len)
        if cache is None and pos:
            raise ValueError("pos > 0 needs the cache that holds positions [0, pos)")
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        full = cache.full if cache is not None else None
        x = self.embed(tokens_BT)
        for i in self.pre_ids:
            x = self.layers[i](x, cos, sin, full, pos)
        if self.cfg.shorten_factor == 1:  # nothing to shorten: the middle is part of a plain stack
            for i in self.mid_ids:
                x = self.layers[i](x, cos, sin, cache.mid if cache is not None else None, pos)
        else:
            x = x + self._middle(x, cache, pos)
        for i in self.post_ids:
            x = self.layers[i](x, cos, sin, full, pos)
        x = self.norm(x)
        return x @ self.embed.weight.t() if self.head is None else self.head(x)

    def _middle(self, x_BTC: torch.Tensor, cache: HourglassCache | None, pos: int) -> torch.Tensor:
        """The middle's upsampled update for positions [pos, pos+T): [B, T, C]."""
        B, T, C = x_BTC.shape
        k = self.cfg.shorten_factor
        if cache is not None:
            cache.bottom[:, k - 1 + pos:k - 1 + pos + T] = x_BTC
            shifted = cache.bottom
        else:
            shifted = F.pad(x_BTC, (0, 0, k - 1, 0))
        # Shortened positions that complete in this call: j with jk in [pos, pos+T).
        j0, j1 = -(-pos // k), (pos + T - 1) // k + 1
        if j1 > j0:
            groups_BJKC = shifted[:, j0 * k:j1 * k].reshape(B, j1 - j0, k, C)
            if self.pool is None:
                z = groups_BJKC.mean(2)
            else:
                z = self.pool(groups_BJKC.flatten(2))
            h = z
            cos, sin = self.rope_cos[j0:j1], self.rope_sin[j0:j1]
            for i in self.mid_ids:
                h = self.layers[i](h, cos, sin, cache.mid if cache is not None else None, j0)
            u = h - z
            if self.up is None:
                up = u.repeat_interleave(k, dim=1)
            else:
                up = self.up(u).view(B, (j1 - j0) * k, C)
        if cache is None:
            return up[:, :T]
        if j1 > j0:
            cache.update[:, j0 * k:j1 * k] = up
        return cache.update[:, pos:pos + T]

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> HourglassCache:
        check_causal_routing(self.cfg.moe)
        p = self.embed.weight
        return HourglassCache(self.cfg, batch, max_len or self.cfg.max_seq_len, dtype or p.dtype, p.device)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * active matmul params (the middle's, pooling's and
        upsampling's divided by k: they run once per k tokens) + attention scores at both resolutions."""
        cfg, k = self.cfg, self.cfg.shorten_factor
        short = tuple(f"layers.{i}." for i in self.mid_ids) + ("pool.", "up.")
        short_n = active_matmul_params(self, lambda name, p: name.startswith(short))
        full_n = active_matmul_params(self, lambda name, p: not name.startswith(short))
        n_full_layers = cfg.n_pre_layers + cfg.n_post_layers
        attn = 12 * cfg.d_model * (n_full_layers * seq_len + cfg.n_mid_layers * seq_len / k / k)
        return 6 * (full_n + short_n / k) + attn


PRESETS = {
    "debug": dict(max_seq_len=64, d_model=32, n_heads=4, d_ff=64, n_pre_layers=1, n_mid_layers=2,
                  n_post_layers=1, shorten_factor=2),
    "small": dict(max_seq_len=256, d_model=256, n_heads=4, n_pre_layers=1, n_mid_layers=2,
                  n_post_layers=1, shorten_factor=2),
}

register("hourglass", HourglassConfig, Hourglass, PRESETS)
