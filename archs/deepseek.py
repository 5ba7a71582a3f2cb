"""DeepSeek-V3: multi-head latent attention (MLA), YaRN RoPE, DeepSeek-routed MoE FFNs after
`first_k_dense` dense layers.

MLA (DeepSeek-V2 section 2.1): keys and values of every head are expanded from one small latent
per token, c = RMSNorm(W_dkv x) of width `kv_lora_rank`, plus one RoPE key of width
`qk_rope_head_dim` shared by all heads (RoPE cannot be folded into the expansion, so it rides
beside the latent). Each query head is [nope | rope] (`qk_nope_head_dim` + `qk_rope_head_dim`),
optionally through its own low-rank bottleneck (`q_lora_rank`). Values have `v_head_dim`.

Training and prefill expand the latent into per-head keys/values (one SDPA, like any attention).
Decoding caches only the latent and the RoPE key, kv_lora_rank + qk_rope_head_dim numbers per
token and layer (not 2 x heads x head_dim), and "absorbs" the expansion into the query and output
instead of re-expanding the whole cache every step: q_nope . (W_uk c) = (W_uk^T q_nope) . c, and
sum_s p_s W_uv c_s = W_uv (sum_s p_s c_s). So a decode step attends over the latent directly,
as one single-key-head attention of width kv_lora_rank + qk_rope_head_dim.

Routing (moe/): sigmoid scores, a selection-only correction bias, group-limited top-k (groups
scored by their two best experts), renormalised top-k weights times `routed_scaling_factor`, and
always-on shared experts: all options of `MoEConfig`, no family-specific router.

Shape letters as in archs/common.py, plus R the KV latent width, P the RoPE part of a head,
N its no-RoPE part, V the value head dim, S cached positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F

from archs.common import (PreNormBlock, RMSNorm, RotaryLM, apply_rope, init_weights, residual_scale, rope_tables,
                          rope_tables_from)
from archs.ffn import active_matmul_params, check_causal_routing, make_ffn
from archs.registry import register
from moe.config import MoEConfig


@dataclass
class YarnConfig:
    """YaRN RoPE scaling (Peng et al. 2023) as DeepSeek-V3 uses it (transformers' `rope_type: yarn`)."""

    factor: Annotated[float, "context extension factor s (positions interpolated by s in the low frequencies)"] = 1.0
    original_max_seq_len: Annotated[int, "the pre-training context (original_max_position_embeddings)"] = 4096
    beta_fast: Annotated[float, "rotations above which a frequency is extrapolated (kept)"] = 32.0
    beta_slow: Annotated[float, "rotations below which a frequency is interpolated (divided by factor)"] = 1.0
    mscale: Annotated[float, "attention-temperature coefficient of the RoPE tables: 0.1 * mscale * ln(s) + 1"] = 1.0
    mscale_all_dim: Annotated[float, "the same over all dims: the tables are divided by it, the softmax scale multiplied by its square; 0 = off"] = 0.0

    def __post_init__(self):
        if self.factor < 1:
            raise ValueError(f"yarn.factor: must be >= 1, got {self.factor}")
        if self.original_max_seq_len < 1:
            raise ValueError(f"yarn.original_max_seq_len: must be >= 1, got {self.original_max_seq_len}")
        if self.beta_fast <= self.beta_slow or self.beta_slow <= 0:
            raise ValueError(f"yarn.beta_fast/beta_slow: need beta_fast > beta_slow > 0, got {self.beta_fast}/{self.beta_slow}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, theta: float, y: YarnConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2], factor on the cos/sin tables) of YaRN.

    Frequencies that turn fewer than beta_slow times over the original context are divided by
    `factor`, those above beta_fast are kept, a linear ramp in between (in dimension index).
    Computed in fp32 like transformers' `_compute_yarn_parameters`, so tables agree bit for bit.
    """
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (y.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high = min(math.ceil(correction_dim(y.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (high frequency), 0 = interpolate
    inv_freq = inter * (1 - keep) + extra * keep
    if y.mscale and y.mscale_all_dim:
        table_scale = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
    else:
        table_scale = yarn_mscale(y.factor)
    return inv_freq, float(table_scale)


@dataclass
class DeepSeekV3Config:
    arch: Annotated[str, "architecture family (registry key)"] = "deepseek_v3"
    vocab_size: Annotated[int | None, "vocabulary size; null takes it from the dataset's metadata"] = None
    max_seq_len: Annotated[int, "longest sequence the model accepts (RoPE table size)"] = 256
    d_model: Annotated[int, "model width"] = 256
    n_layers: Annotated[int, "number of blocks"] = 4
    n_heads: Annotated[int, "attention heads"] = 4
    q_lora_rank: Annotated[int | None, "query bottleneck width (W_dq, RMSNorm, W_uq); null = one full query projection"] = None
    kv_lora_rank: Annotated[int, "KV latent width R: what the decode cache keeps per token besides the RoPE key"] = 64
    qk_nope_head_dim: Annotated[int, "per-head query/key width without RoPE (expanded from the latent)"] = 32
    qk_rope_head_dim: Annotated[int, "per-head query width with RoPE; the key's RoPE part is one vector shared by all heads"] = 16
    v_head_dim: Annotated[int, "per-head value width"] = 32
    d_ff: Annotated[int | None, "hidden width of the dense SwiGLU layers; null = 8/3 * d_model rounded up to a multiple of 64"] = None
    first_k_dense: Annotated[int, "the first k layers have a dense FFN (DeepSeek's first_k_dense_replace); the rest are MoE"] = 1
    moe: Annotated[MoEConfig | None, "the MoE FFNs of layers >= first_k_dense; null = every FFN dense"] = field(default_factory=MoEConfig)
    rope_theta: Annotated[float, "RoPE base frequency"] = 10000.0
    yarn: Annotated[YarnConfig | None, "YaRN RoPE scaling; null = plain RoPE"] = None
    norm_eps: Annotated[float, "RMSNorm epsilon of the blocks and the final norm"] = 1e-6
    latent_norm_eps: Annotated[float, "RMSNorm epsilon of the q/kv latents (transformers keeps 1e-6 whatever rms_norm_eps is)"] = 1e-6
    tie_embeddings: Annotated[bool, "share the input embedding with the output head"] = False
    init_std: Annotated[float, "std of the normal weight init"] = 0.02

    def __post_init__(self):
        # mappings (a preset's, or a caller's) become the nested configs, as the job loader does
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.yarn, dict):
            self.yarn = YarnConfig(**self.yarn)
        for name in ("max_seq_len", "d_model", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"q_lora_rank: must be >= 1 or null, got {self.q_lora_rank}")
        if not 0 <= self.first_k_dense <= self.n_layers:
            raise ValueError(f"first_k_dense: must be in [0, n_layers={self.n_layers}], got {self.first_k_dense}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {self.vocab_size}")

    @property
    def hidden(self) -> int:
        return self.d_ff or 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [] if self.moe is None else list(range(self.first_k_dense, self.n_layers))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk head dim), times YaRN's mscale(factor, mscale_all_dim)^2 (the temperature the
        tables' 1/mscale_all_dim took out of q and k each)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            scale *= yarn_mscale(self.yarn.factor, self.yarn.mscale_all_dim) ** 2
        return scale


class MLACache:
    """Per layer and position the normalised KV latent and the rotated shared RoPE key, side by
    side in one buffer [L, B, max_len, R + P] ((R + P) numbers per token and layer), so that a
    decode step reads the cached keys as one view, without concatenating them."""

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.kv = torch.zeros(n_layers, batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.rank, self.max_len = kv_lora_rank, max_len

    def update(self, layer: int, pos: int, c_BTR: torch.Tensor, kr_BTP: torch.Tensor) -> torch.Tensor:
        """Store positions [pos, pos+T); return [latent | RoPE key] of [0, pos+T): [B, S, R + P]."""
        end = pos + c_BTR.shape[1]
        if end > self.max_len:
            raise ValueError(f"MLA cache holds {self.max_len} positions, asked to write up to {end}")
        self.kv[layer, :, pos:end, :self.rank] = c_BTR
        self.kv[layer, :, pos:end, self.rank:] = kr_BTP
        return self.kv[layer, :, :end]

    def nbytes(self) -> int:
        return self.kv.nbytes


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class MLAttention(nn.Module):
    """Multi-head latent attention; called as `attn(x, cos, sin, cache, layer, pos)` like `Attention`.

    Module names follow DeepSeek's reference code (wq | wq_a, q_norm, wq_b; wkv_a, kv_norm, wkv_b; wo).
    Output features of wq/wq_b and wkv_b are head-major, so tensor parallelism can shard them by
    whole heads (column-parallel) and wo by the same heads (row-parallel); wq_a, wkv_a and the
    latent norms are shared by all heads and stay replicated (see `tp_plan`).
    """

    def __init__(self, cfg: DeepSeekV3Config):
        super().__init__()
        C, H = cfg.d_model, cfg.n_heads
        self.nope, self.rope, self.v_dim, self.rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(C, H * cfg.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(C, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps=cfg.latent_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(C, self.rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.rank, eps=cfg.latent_norm_eps)
        self.wkv_b = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, C, bias=False)
        self.tp_plan = {("wq" if cfg.q_lora_rank is None else "wq_b"): "colwise", "wkv_b": "colwise", "wo": "rowwise"}
        # The shared RoPE key reaches attention without passing a sharded linear, so under TP each
        # rank's backward holds only its own heads' part of its gradient; tensor parallelism
        # replaces this identity by one whose backward sums over the TP group.
        self.shared_key_hook = _identity

    def forward(self, x_BTC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: MLACache | None = None, layer: int = 0, pos: int = 0) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        q = self.wq(x_BTC) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x_BTC)))
        q_BHTN, q_BHTP = q.view(B, T, -1, self.nope + self.rope).transpose(1, 2).split([self.nope, self.rope], dim=-1)
        q_BHTP = apply_rope(q_BHTP, cos, sin)
        c_BTR, kr_BTP = self.wkv_a(x_BTC).split([self.rank, self.rope], dim=-1)
        c_BTR = self.kv_norm(c_BTR)
        kr_BTP = self.shared_key_hook(apply_rope(kr_BTP[:, None], cos, sin)[:, 0])
        if cache is not None:
            kv_BSX = cache.update(layer, pos, c_BTR, kr_BTP)
        if pos == 0:  # training or prefill: expand the T latents into per-head keys and values
            out_BHTV = self._attend_expanded(q_BHTN, q_BHTP, c_BTR, kr_BTP)
        else:
            out_BHTV = self._attend_absorbed(q_BHTN, q_BHTP, kv_BSX, pos)
        return self.wo(out_BHTV.transpose(1, 2).reshape(B, T, -1))

    def _attend_expanded(self, q_BHTN, q_BHTP, c_BTR, kr_BTP) -> torch.Tensor:
        B, T, _ = c_BTR.shape
        kv_BHTX = self.wkv_b(c_BTR).view(B, T, -1, self.nope + self.v_dim).transpose(1, 2)
        k_BHTN, v_BHTV = kv_BHTX.split([self.nope, self.v_dim], dim=-1)
        H = k_BHTN.shape[1]
        k = torch.cat([k_BHTN, kr_BTP[:, None].expand(B, H, T, self.rope)], dim=-1)
        q = torch.cat([q_BHTN, q_BHTP], dim=-1)
        return F.scaled_dot_product_attention(q, k, v_BHTV, is_causal=True, scale=self.scale)

    def _attend_absorbed(self, q_BHTN, q_BHTP, kv_BSX, pos: int) -> torch.Tensor:
        """Queries at [pos, pos+T) over the cached [latent | RoPE key] of [0, pos+T), without
        expanding them: every head shares the one "key head", so the H x T queries attend as the
        rows of a single head (one [H*T, S] score matrix, no per-head copies of the cache)."""
        B, H, T, _ = q_BHTN.shape
        S = kv_BSX.shape[1]
        w_HXR = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.rank)
        w_uk_HNR, w_uv_HVR = w_HXR.split([self.nope, self.v_dim], dim=1)
        q_lat_BHTR = torch.einsum("bhtn,hnr->bhtr", q_BHTN, w_uk_HNR)
        q = torch.cat([q_lat_BHTR, q_BHTP], dim=-1).reshape(B, 1, H * T, self.rank + self.rope)
        allowed_TS = torch.arange(S, device=q.device)[None, :] <= torch.arange(pos, pos + T, device=q.device)[:, None]
        o_lat = F.scaled_dot_product_attention(q, kv_BSX[:, None], kv_BSX[:, None, :, :self.rank],
                                               attn_mask=allowed_TS.repeat(H, 1), scale=self.scale)
        return torch.einsum("bhtr,hvr->bhtv", o_lat.view(B, H, T, self.rank), w_uv_HVR)


def build_block(cfg: DeepSeekV3Config, layer_id: int) -> PreNormBlock:
    mlp = make_ffn(cfg.d_model, cfg.hidden, cfg, layer_id, cfg.init_std, residual_scale(cfg.init_std, cfg.n_layers))
    return PreNormBlock(cfg.d_model, cfg.norm_eps, MLAttention(cfg), mlp, layer_id)


class DeepSeekV3(RotaryLM):
    def __init__(self, cfg: DeepSeekV3Config):
        super().__init__(cfg, build_block, cfg.qk_rope_head_dim)
        self.rope_cos, self.rope_sin = self.rope_buffers(cfg)
        # Linears and the MoE gate/shared expert (nn.Linear) drawn here; the grouped experts keep
        # the init make_ffn gave them (the same std / residual std).
        init_weights(self, cfg.init_std, residual_scale(cfg.init_std, cfg.n_layers), ("wo", "w2"))

    @staticmethod
    def rope_buffers(cfg: DeepSeekV3Config) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [max_seq_len, P/2] of the RoPE part: YaRN-scaled when configured."""
        if cfg.yarn is None:
            return rope_tables(cfg.max_seq_len, cfg.qk_rope_head_dim, cfg.rope_theta)
        inv_freq, table_scale = yarn_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.yarn)
        return rope_tables_from(inv_freq, cfg.max_seq_len, table_scale)

    def forward(self, tokens_BT: torch.Tensor, cache: MLACache | None = None, pos: int = 0) -> torch.Tensor:
        """tokens [B, T] (positions pos..pos+T-1) -> logits [B, T, vocab]."""
        self.check_length(pos, tokens_BT.shape[1])
        return self.run(tokens_BT, cache, pos)

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> MLACache:
        check_causal_routing(self.cfg.moe)
        cfg, p = self.cfg, self.embed.weight
        return MLACache(cfg.n_layers, batch, max_len or cfg.max_seq_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                        dtype or p.dtype, p.device)

    def flops_per_token(self, seq_len: int) -> float:
        """6 * active matmul params + attention: per key, H * (qk head dim + v head dim) MACs per
        layer forward (the expanded form training uses), x 3 for forward + backward."""
        cfg = self.cfg
        per_key = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
        return 6 * active_matmul_params(self) + 6 * cfg.n_layers * per_key * seq_len


DEEPSEEK_ROUTING = dict(score_func="sigmoid", renormalize=True, selection_bias=True, routed_scaling_factor=2.5,
                        aux_loss_coeff=0.0, seq_aux_loss_coeff=1e-4, z_loss_coeff=0.0, bias_update_rate=1e-3)

PRESETS = {
    "debug": dict(max_seq_len=64, d_model=32, n_layers=2, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=8, d_ff=64, first_k_dense=1,
                  moe=dict(num_experts=4, top_k=2, expert_hidden=16, num_groups=2, group_topk=1,
                           shared_expert_hidden=16, **DEEPSEEK_ROUTING)),
    "small": dict(max_seq_len=256, d_model=256, n_layers=4, n_heads=4, q_lora_rank=128, kv_lora_rank=64,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, d_ff=704, first_k_dense=1,
                  moe=dict(num_experts=16, top_k=4, expert_hidden=128, num_groups=4, group_topk=2,
                           shared_expert_hidden=128, **DEEPSEEK_ROUTING)),
}

register("deepseek_v3", DeepSeekV3Config, DeepSeekV3, PRESETS)
