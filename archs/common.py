"""Blocks shared by the model families: RMSNorm, rotary embeddings, SwiGLU MLP, attention, KV cache,
the pre-norm residual block.

Shape letters: B batch, T query length, S key length, H query heads, G key/value heads,
D head dim, C model width (d_model), F MLP hidden width, W local-attention window.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.experts import SwiGLU  # noqa: F401  (the dense MLP; re-exported for the families)


class RMSNorm(nn.RMSNorm):
    """RMSNorm without bias; torch's, kept as a named type so parallel plans can match it."""


ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(scaling: dict | None) -> None:
    """`rope_scaling` is null or {"type": linear|llama3, and that type's keys}; raises naming the key."""
    if scaling is None:
        return
    kind = scaling.get("type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling.type: {kind!r} is not one of {sorted(ROPE_SCALINGS)} (or set rope_scaling: null)")
    need, have = set(ROPE_SCALINGS[kind]), set(scaling) - {"type"}
    if need != have:
        raise ValueError(f"rope_scaling: type {kind} takes exactly {sorted(need)}; missing {sorted(need - have)}, "
                         f"unknown {sorted(have - need)}")


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (float64), with linear (position interpolation) or
    Llama-3.1 scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["type"] == "linear":
        return inv_freq / factor
    old_len = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_tables(max_len: int, head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [max_len, head_dim/2] for rotary position embeddings (fp32)."""
    return rope_tables_from(rope_frequencies(head_dim, theta, scaling), max_len)


def rope_tables_from(inv_freq_D2: torch.Tensor, max_len: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_len, D/2] for given inverse frequencies (scaled RoPE variants such as
    YaRN compute their own), times `scale` (YaRN's attention factor multiplies both)."""
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq_D2.double())
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def apply_rope(x_BHTD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head dimension by position-dependent angles."""
    half = x_BHTD.shape[-1] // 2
    x1, x2 = x_BHTD[..., :half], x_BHTD[..., half:]
    cos, sin = cos_TD2.to(x_BHTD.dtype), sin_TD2.to(x_BHTD.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Preallocated keys/values of every layer for incremental decoding: [L, B, G, max_len, D]."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, pos: int, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor):
        """Store keys/values for positions [pos, pos+T) and return those of [0, pos+T)."""
        end = pos + k_BGTD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[layer, :, :, pos:end] = k_BGTD
        self.v[layer, :, :, pos:end] = v_BGTD
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def local_attention(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor, window: int) -> torch.Tensor:
    """Causal sliding-window attention: query t sees keys (t - window, t].

    Computed blockwise: queries are cut into blocks of `window`; each block attends to its own
    keys and the previous block's, so scores are [T/W, W, 2W] per head, i.e. O(T * W) time and
    memory, never a [T, T] matrix.
    """
    B, H, T, D = q_BHTD.shape
    W = window
    nb = -(-T // W)
    pad = nb * W - T
    if pad:  # NOTE: padded queries are dropped; padded keys sit after every real query (causal)
        q_BHTD, k_BHTD, v_BHTD = (F.pad(t, (0, 0, 0, pad)) for t in (q_BHTD, k_BHTD, v_BHTD))
    # Keys shifted right by one block so block b sees absolute keys [(b-1)W, (b+1)W).
    k_blocks = F.pad(k_BHTD, (0, 0, W, 0)).unfold(2, 2 * W, W).transpose(-1, -2)  # [B,H,nb,2W,D]
    v_blocks = F.pad(v_BHTD, (0, 0, W, 0)).unfold(2, 2 * W, W).transpose(-1, -2)
    q_blocks = q_BHTD.view(B, H, nb, W, D)
    a = torch.arange(W, device=q_BHTD.device)[:, None]  # query offset inside its block
    c = torch.arange(2 * W, device=q_BHTD.device)[None, :]  # key offset inside the 2W span
    allowed_WW2 = (c > a) & (c <= a + W)  # key abs = bW - W + c, query abs = bW + a
    mask = allowed_WW2.expand(nb, W, 2 * W).clone()
    mask[0, :, :W] = False  # block 0 has no previous block: those keys are padding
    out = F.scaled_dot_product_attention(q_blocks, k_blocks, v_blocks, attn_mask=mask)
    return out.reshape(B, H, nb * W, D)[:, :, :T]


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE, grouped KV heads, optional local window.

    Full attention goes through `scaled_dot_product_attention` (FlashAttention / fused kernels
    where the device has them). With `window`, training and prefill use `local_attention`.
    Options of imported checkpoints (defaults: none of them): `head_dim` independent of
    d_model / n_heads (Qwen3), biases on q/k/v ("qkv", Qwen2) or also on the output ("qkvo",
    Llama's attention_bias), and RMSNorm of queries and keys before RoPE, per head ("head", Qwen3)
    or over the whole projection ("full", OLMoE).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, window: int | None = None,
                 head_dim: int | None = None, bias: str = "none", qk_norm: str = "none", norm_eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.window = window
        self.qk_norm = qk_norm
        HD, GD = n_heads * self.head_dim, n_kv_heads * self.head_dim
        self.wq = nn.Linear(d_model, HD, bias=bias != "none")
        self.wk = nn.Linear(d_model, GD, bias=bias != "none")
        self.wv = nn.Linear(d_model, GD, bias=bias != "none")
        self.wo = nn.Linear(HD, d_model, bias=bias == "qkvo")
        if qk_norm != "none":
            width_q, width_k = (self.head_dim, self.head_dim) if qk_norm == "head" else (HD, GD)
            self.q_norm = RMSNorm(width_q, eps=norm_eps)
            self.k_norm = RMSNorm(width_k, eps=norm_eps)

    def forward(self, x_BTC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0, pos: int = 0) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        q, k = self.wq(x_BTC), self.wk(x_BTC)
        if self.qk_norm == "full":  # NOTE: needs whole projections, so tensor parallelism refuses it
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, -1, self.head_dim)
        k = k.view(B, T, -1, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.wv(x_BTC).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, pos, k, v)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if pos == 0:  # training, or prefill of a fresh cache: keys are exactly these T positions
            if self.window is None or T <= self.window:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                out = local_attention(q, k, v, self.window)
        else:
            out = self._attend_cached(q, k, v, pos)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def _attend_cached(self, q_BHTD, k_BHSD, v_BHSD, pos: int) -> torch.Tensor:
        """Queries at positions [pos, pos+T) over cached keys [0, pos+T) (decoding)."""
        T = q_BHTD.shape[2]
        start = 0 if self.window is None else max(0, pos - self.window + 1)
        k_BHSD, v_BHSD = k_BHSD[:, :, start:], v_BHSD[:, :, start:]
        qpos = torch.arange(pos, pos + T, device=q_BHTD.device)[:, None]
        kpos = torch.arange(start, pos + T, device=q_BHTD.device)[None, :]
        allowed = kpos <= qpos
        if self.window is not None:
            allowed &= qpos - kpos < self.window
        return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=allowed)


class PreNormBlock(nn.Module):
    """x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)): the pre-norm residual block of the
    attention families (dense, local-window, hourglass, sparse, Performer).

    `attn` is any causal mixer called as `attn(x, cos, sin, cache, layer, pos)` (the contract of
    `Attention`); `cache_layer` is this block's layer in that cache. `mlp` is the FFN slot (a
    SwiGLU or an MoE layer, see `archs.ffn.make_ffn`). Submodule names are the checkpoint keys
    (`attn_norm`, `attn`, `mlp_norm`, `mlp`) every attention family shares.
    """

    def __init__(self, d_model: int, norm_eps: float, attn: nn.Module, mlp: nn.Module, cache_layer: int):
        super().__init__()
        self.cache_layer = cache_layer
        self.attn_norm = RMSNorm(d_model, eps=norm_eps)
        self.attn = attn
        self.mlp_norm = RMSNorm(d_model, eps=norm_eps)
        self.mlp = mlp

    def forward(self, x_BTC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, pos: int = 0) -> torch.Tensor:
        x_BTC = x_BTC + self.attn(self.attn_norm(x_BTC), cos, sin, cache, self.cache_layer, pos)
        return x_BTC + self.mlp(self.mlp_norm(x_BTC))


def init_weights(module: nn.Module, std: float, residual_std: float, residual_names: tuple[str, ...]) -> None:
    """Normal(0, std) for linears/embeddings; `residual_std` for projections into the residual stream."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            s = residual_std if name.split(".")[-1] in residual_names else std
            nn.init.normal_(m.weight, mean=0.0, std=s)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def residual_scale(std: float, n_layers: int) -> float:
    """GPT-2's scaling of residual-stream projections: std / sqrt(2 * n_layers)."""
    return std / math.sqrt(2 * n_layers)


def check_heads(d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None) -> None:
    """The attention shape checks every family shares (heads divide the width, RoPE's even head
    dimension, query heads a multiple of key/value heads). An explicit `head_dim` need not divide."""
    if head_dim is not None:
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim: must be even and >= 2 for RoPE, got {head_dim}")
    elif d_model % n_heads:
        raise ValueError(f"n_heads: {n_heads} does not divide d_model={d_model}")
    elif (d_model // n_heads) % 2:
        raise ValueError(f"n_heads: head dim d_model/n_heads={d_model // n_heads} must be even for RoPE")
    kv = n_kv_heads or n_heads
    if n_heads % kv:
        raise ValueError(f"n_kv_heads: {kv} does not divide n_heads={n_heads}")


def check_sequence_length(pos: int, T: int, max_seq_len: int) -> None:
    """Positions [pos, pos + T) must fit the model (RoPE tables, caches, learned positions)."""
    if pos + T > max_seq_len:
        raise ValueError(f"sequence of {pos + T} tokens exceeds model.max_seq_len={max_seq_len}; "
                         "shorten the input or train with a larger model.max_seq_len")


class RotaryLM(nn.Module):
    """embed -> blocks (rotary positions) -> norm -> head, tied to the embedding unless told
    otherwise: the body the transformer-like families share. Subclasses give the blocks through
    `make_block(cfg, layer_id)` and keep their own cache types; parameter names (`embed`,
    `layers.<i>`, `norm`, `head`) are the checkpoint keys of every such family."""

    def __init__(self, cfg, make_block, head_dim: int, rope_scaling: dict | None = None):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is null: set it, or build through the job config, which takes it from the data")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): make_block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.max_seq_len, head_dim, cfg.rope_theta, rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def check_length(self, pos: int, T: int) -> None:
        check_sequence_length(pos, T, self.cfg.max_seq_len)

    def run(self, tokens_BT: torch.Tensor, cache=None, pos: int = 0) -> torch.Tensor:
        """tokens [B, T] (positions pos..pos+T-1) -> logits [B, T, vocab]."""
        T = tokens_BT.shape[1]
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        x = self.embed(tokens_BT)
        for block in self.layers.values():
            x = block(x, cos, sin, cache, pos)
        x = self.norm(x)
        return x @ self.embed.weight.t() if self.head is None else self.head(x)
