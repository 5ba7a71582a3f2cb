"""Performer language model: causal linear attention with FAVOR+ random features (Choromanski et al.).

Softmax attention weights exp(q.k / sqrt(D)) are replaced by phi(q).phi(k) with positive random
features phi(x) = exp(w_j.x - |x|^2 / 2) over m orthogonal Gaussian directions w_j (scaled so each
row keeps a Gaussian norm), x = q / D^(1/4): an unbiased estimate whose error falls as m grows.
Causal attention is then a prefix sum over keys of phi(k_s) v_s^T and phi(k_s), computed in chunks
(`favor_causal`): inside a chunk an [L, L] masked product, across chunks a running state, so time
and memory are O(T) with a loop over chunks only. Generation carries the same state (running sum
S [m, D], normaliser z [m] and a stabiliser offset per head): O(1) work per token. For ONNX
export, `Performer.export_form()` switches the cache-free forward to one [T, T] chunk
(`favor_causal_whole`: no loop, so the trace holds for every length; O(T^2) memory per head).

Stabilisers (exact: each cancels between numerator and denominator):
- queries: subtract each token's max over features;
- keys: subtract the running max M_s (over positions <= s and features) and rescale older terms by
  exp(M_s - M_t) <= 1 when query t's offset M_t is larger (the online-softmax trick). Using only
  past keys keeps the stabiliser causal, so a future token cannot change earlier outputs.

Feature redraw: each layer's projection [m, D] is a persistent buffer; the model counts training
forward calls in a persistent buffer too, and every `redraw_every` calls draws projection number
calls // redraw_every from a generator seeded by (feature_seed, layer, draw number). Both buffers
are in the state dict, so a resumed run redraws at the same calls to the same matrices. The count
lives at the model level, outside the blocks that activation checkpointing recomputes.

Shape letters: B batch, T time, C model width, H heads, D head dim, M random features, L chunk,
V vocabulary.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F

from archs.common import (
    PreNormBlock,
    RotaryLM,
    apply_rope,
    check_heads,
    init_weights,
    residual_scale,
)
from archs.ffn import MoEOptions, active_matmul_params, check_causal_routing, make_ffn
from archs.registry import register

# ----------------------------------------------------------------------------------------------
# FAVOR+ attention
# ----------------------------------------------------------------------------------------------


def orthogonal_gaussian(n_features: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n_features, dim] rows orthogonal within each block of `dim`, each scaled to the norm of a
    Gaussian vector (so every row is marginally N(0, I), as FAVOR+'s estimator needs)."""
    blocks = []
    for _ in range(-(-n_features // dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64, device="cpu"))
        blocks.append(q.t())
    rows = torch.cat(blocks)[:n_features]
    gaussian = torch.randn(n_features, dim, generator=generator, dtype=torch.float64, device="cpu")
    norms = gaussian.norm(dim=1, keepdim=True)
    return (rows * norms).float()


def feature_logits(x_BHTD: torch.Tensor, proj_MD: torch.Tensor) -> torch.Tensor:
    """log of the positive random features (before any stabiliser): w_j.x' - |x'|^2 / 2, x' = x / D^(1/4).

    [B, H, T, D] -> [B, H, T, M]; phi(q').phi(k') estimates exp(q.k / sqrt(D)) (up to a constant m).
    """
    x = x_BHTD * x_BHTD.shape[-1] ** -0.25
    return x @ proj_MD.t().to(x.dtype) - 0.5 * x.square().sum(-1, keepdim=True)


@dataclass
class FavorState:
    """Prefix sums over the keys seen so far, all scaled by exp(-offset): S = sum phi(k) v^T,
    z = sum phi(k); offset = the running key-stabiliser max."""

    S_BHMD: torch.Tensor
    z_BHM: torch.Tensor
    offset_BH: torch.Tensor


def favor_causal(qlog_BHTM: torch.Tensor, klog_BHTM: torch.Tensor, v_BHTD: torch.Tensor, chunk: int = 64,
                 state: FavorState | None = None, min_denominator: float = 1e-30) -> tuple[torch.Tensor, FavorState]:
    """Causal linear attention out_t = sum_{s<=t} phi_q(t).phi_k(s) v_s / sum_{s<=t} phi_q(t).phi_k(s).

    Inputs are feature logits (`feature_logits`) and values; `state` continues an earlier call
    (generation). Chunks of `chunk` positions: [L, L] products inside a chunk, a loop over chunks
    carrying the state. Returns out [B, H, T, D] and the state after the last position.
    """
    Bsz, H, T, M = qlog_BHTM.shape
    Dv = v_BHTD.shape[-1]
    L = max(1, min(chunk, T))
    nc = -(-T // L)
    pad = nc * L - T
    if pad:  # NOTE: padded keys get logit -inf (feature 0): they change neither outputs nor the state
        qlog_BHTM = F.pad(qlog_BHTM, (0, 0, 0, pad))
        klog_BHTM = F.pad(klog_BHTM, (0, 0, 0, pad), value=float("-inf"))
        v_BHTD = F.pad(v_BHTD, (0, 0, 0, pad))
    if state is None:
        state = FavorState(v_BHTD.new_zeros(Bsz, H, M, Dv), v_BHTD.new_zeros(Bsz, H, M),
                           v_BHTD.new_full((Bsz, H), float("-inf")))

    # Stabilisers are constants for autograd: mathematically they cancel.
    phi_q = torch.exp(qlog_BHTM - qlog_BHTM.detach().amax(-1, keepdim=True))
    offset_BHT = torch.maximum(klog_BHTM.detach().amax(-1).cummax(-1).values, state.offset_BH[..., None])
    phi_k = torch.exp(klog_BHTM - offset_BHT[..., None])

    # Chunked views [B, H, c, L, .]
    phi_q, phi_k = phi_q.view(Bsz, H, nc, L, M), phi_k.view(Bsz, H, nc, L, M)
    v = v_BHTD.view(Bsz, H, nc, L, Dv)
    off_BHcL = offset_BHT.view(Bsz, H, nc, L)
    end_BHc = off_BHcL[..., -1]  # offset at the end of each chunk (the largest in it)

    # Inside a chunk: weights phi_q(t).phi_k(s) exp(M_s - M_t) for s <= t.
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=v.device).tril()
    rescale_BHcLL = (off_BHcL[..., None, :] - off_BHcL[..., :, None]).masked_fill(~causal_LL, float("-inf")).exp()
    weights_BHcLL = (phi_q @ phi_k.transpose(-1, -2)) * rescale_BHcLL
    num_BHcLD = weights_BHcLL @ v
    den_BHcL = weights_BHcLL.sum(-1)

    # Each chunk's keys summed at the chunk-end offset; then the running state, one step per chunk.
    k_end = phi_k * torch.exp(off_BHcL - end_BHc[..., None])[..., None]
    chunk_S_BHcMD = k_end.transpose(-1, -2) @ v
    chunk_z_BHcM = k_end.sum(-2)
    S, z, off = state.S_BHMD, state.z_BHM, state.offset_BH
    entering_S, entering_z, entering_off = [], [], []
    for c in range(nc):
        entering_S.append(S), entering_z.append(z), entering_off.append(off)
        decay = torch.exp(off - end_BHc[..., c])  # <= 1; 0 for a fresh state (offset -inf)
        S = decay[..., None, None] * S + chunk_S_BHcMD[:, :, c]
        z = decay[..., None] * z + chunk_z_BHcM[:, :, c]
        off = end_BHc[..., c]
    S_in, z_in = torch.stack(entering_S, 2), torch.stack(entering_z, 2)
    # The carried state (offset of the previous chunk end) seen from query t at offset M_t.
    q_scaled = phi_q * torch.exp(torch.stack(entering_off, 2)[..., None] - off_BHcL)[..., None]
    num_BHcLD = num_BHcLD + q_scaled @ S_in
    den_BHcL = den_BHcL + (q_scaled @ z_in[..., None]).squeeze(-1)

    out = num_BHcLD / den_BHcL.clamp_min(min_denominator)[..., None]
    return out.reshape(Bsz, H, nc * L, Dv)[:, :, :T], FavorState(S, z, off)


def favor_causal_whole(qlog_BHTM: torch.Tensor, klog_BHTM: torch.Tensor, v_BHTD: torch.Tensor,
                       min_denominator: float = 1e-30) -> torch.Tensor:
    """`favor_causal` from a fresh state with the whole sequence as ONE chunk: the export form.

    The same quantity with the same stabilisers (query max over features; key offset M_s = running
    max over positions <= s, older terms rescaled by exp(M_s - M_t)), built from tensor ops on the
    input's shape only (a [T, T] causal mask, the running max as a masked max), so a trace holds
    for every length. It costs O(T^2) time and memory per head (an [T, T] weight matrix) instead of
    the chunked O(T * chunk): used for ONNX export and inference, never for training or generation.
    """
    T = klog_BHTM.shape[-2]
    pos = torch.arange(T, device=v_BHTD.device)
    causal_TT = pos[:, None] >= pos[None, :]
    phi_q = torch.exp(qlog_BHTM - qlog_BHTM.detach().amax(-1, keepdim=True))
    # NOTE: the running max as a masked max over [T, T] (cummax has no ONNX form); exact like cummax.
    kmax_BHT = klog_BHTM.detach().amax(-1)
    offset_BHT = kmax_BHT[..., None, :].masked_fill(~causal_TT, float("-inf")).amax(-1)
    phi_k = torch.exp(klog_BHTM - offset_BHT[..., None])
    rescale_BHTT = (offset_BHT[..., None, :] - offset_BHT[..., :, None]).masked_fill(~causal_TT, float("-inf")).exp()
    weights_BHTT = (phi_q @ phi_k.transpose(-1, -2)) * rescale_BHTT
    return (weights_BHTT @ v_BHTD) / weights_BHTT.sum(-1).clamp_min(min_denominator)[..., None]


def favor_attention(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor, proj_MD: torch.Tensor,
                    chunk: int = 64, state: FavorState | None = None,
                    whole_sequence: bool = False) -> tuple[torch.Tensor, FavorState | None]:
    """FAVOR+ estimate of causal softmax attention softmax(q k^T / sqrt(D)) v, in fp32.

    `whole_sequence` (export form, fresh state only): one [T, T] chunk (`favor_causal_whole`);
    the returned state is then None."""
    dtype = v_BHTD.dtype
    with torch.autocast(q_BHTD.device.type, enabled=False):  # NOTE: exponentials need fp32 range
        q, k, v = q_BHTD.float(), k_BHTD.float(), v_BHTD.float()
        qlog, klog = feature_logits(q, proj_MD), feature_logits(k, proj_MD)
        if whole_sequence:
            if state is not None:
                raise ValueError("favor_attention: whole_sequence=True computes from a fresh state; "
                                 "continue a state with the chunked form (whole_sequence=False)")
            return favor_causal_whole(qlog, klog, v).to(dtype), None
        out, state = favor_causal(qlog, klog, v, chunk, state)
    return out.to(dtype), state


def favor_causal_ref(qlog_BHTM: torch.Tensor, klog_BHTM: torch.Tensor, v_BHTD: torch.Tensor) -> torch.Tensor:
    """The prefix sums one position at a time, without stabilisers (use float64): the test oracle."""
    phi_q, phi_k = qlog_BHTM.exp(), klog_BHTM.exp()
    S = v_BHTD.new_zeros(*v_BHTD.shape[:2], phi_k.shape[-1], v_BHTD.shape[-1])
    z = v_BHTD.new_zeros(*v_BHTD.shape[:2], phi_k.shape[-1])
    outs = []
    for t in range(v_BHTD.shape[2]):
        S = S + phi_k[:, :, t, :, None] * v_BHTD[:, :, t, None, :]
        z = z + phi_k[:, :, t]
        q = phi_q[:, :, t]
        outs.append((q[..., None, :] @ S).squeeze(-2) / (q * z).sum(-1, keepdim=True))
    return torch.stack(outs, dim=2)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@dataclass
class PerformerConfig(MoEOptions):
    arch: Annotated[str, "architecture family (registry key)"] = "performer"
    vocab_size: Annotated[int | None, "vocabulary size; null takes it from the dataset's metadata"] = None
    max_seq_len: Annotated[int, "longest sequence the model accepts (RoPE table size)"] = 256
    d_model: Annotated[int, "model width"] = 256
    n_layers: Annotated[int, "number of blocks"] = 4
    n_heads: Annotated[int, "attention heads; must divide d_model"] = 4
    nb_features: Annotated[int, "random features m per head (error ~ 1/sqrt(m); the paper uses ~D log D)"] = 128
    chunk_size: Annotated[int, "chunk length of the causal prefix sums (an [L, L] product per chunk)"] = 64
    redraw_every: Annotated[int, "redraw the random features every this many training forward calls; 0 = never"] = 1000
    feature_seed: Annotated[int, "seed of the random features (with layer index and draw number)"] = 0
    d_ff: Annotated[int | None, "SwiGLU hidden width; null = 8/3 * d_model rounded up to a multiple of 64"] = None
    rope_theta: Annotated[float, "RoPE base frequency (rotary positions on q and k before the feature map)"] = 10000.0
    norm_eps: Annotated[float, "RMSNorm epsilon"] = 1e-5
    tie_embeddings: Annotated[bool, "share the input embedding with the output head"] = True
    init_std: Annotated[float, "std of the normal weight init"] = 0.02

    def __post_init__(self):
        for name in ("max_seq_len", "d_model", "n_layers", "n_heads", "nb_features", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        check_heads(self.d_model, self.n_heads)
        if self.redraw_every < 0:
            raise ValueError(f"redraw_every: must be >= 0 (0 = never redraw), got {self.redraw_every}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {self.vocab_size}")
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"d_ff: must be >= 1 or null, got {self.d_ff}")
        self.check_moe(self.n_layers)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        return self.d_ff or 64 * -(-(8 * self.d_model // 3) // 64)


class PerformerCache:
    """Recurrent state for generation: one `FavorState` per layer, constant in sequence length."""

    def __init__(self, n_layers: int):
        self.states: list[FavorState | None] = [None] * n_layers
        self.pos = 0  # next position the state expects


class FavorSelfAttention(nn.Module):
    """Multi-head causal FAVOR+ attention with RoPE; the projection is a buffer the model redraws."""

    def __init__(self, cfg: PerformerConfig, layer_id: int):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        C = cfg.d_model
        self.wq, self.wk, self.wv = (nn.Linear(C, C, bias=False) for _ in range(3))
        self.wo = nn.Linear(C, C, bias=False)
        self.register_buffer("proj", torch.empty(cfg.nb_features, cfg.head_dim))
        self.whole_sequence = False  # export form (`Performer.export_form`): one [T, T] chunk, no cache
        self.redraw(0)

    @torch.no_grad()
    def redraw(self, draw: int) -> None:
        """Set the projection to draw number `draw` of this layer (deterministic from feature_seed)."""
        seed = (self.cfg.feature_seed * 1_000_003 + self.layer_id) * 1_000_003 + draw
        gen = torch.Generator().manual_seed(seed % 2**63)
        self.proj.copy_(orthogonal_gaussian(self.cfg.nb_features, self.cfg.head_dim, gen))

    def forward(self, x_BTC, cos, sin, cache: PerformerCache | None = None, layer: int | None = None,
                pos: int = 0) -> torch.Tensor:
        """`Attention`'s call contract: `layer` is the cache slot (default: this layer's id); `pos` is
        not needed (the cache's state sits at the position the model checked)."""
        B, T, C = x_BTC.shape
        H, D = self.cfg.n_heads, self.cfg.head_dim
        q, k, v = (w(x_BTC).view(B, T, H, D).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        slot = self.layer_id if layer is None else layer
        state = cache.states[slot] if cache is not None else None
        whole = self.whole_sequence and cache is None
        out, state = favor_attention(q, k, v, self.proj, self.cfg.chunk_size, state, whole_sequence=whole)
        if cache is not None:
            cache.states[slot] = state
        return self.wo(out.transpose(1, 2).reshape(B, T, C))


def build_block(cfg: PerformerConfig, layer_id: int, std: float, out_std: float) -> PreNormBlock:
    attn = FavorSelfAttention(cfg, layer_id)
    return PreNormBlock(cfg.d_model, cfg.norm_eps, attn, make_ffn(cfg.d_model, cfg.hidden, cfg, layer_id, std, out_std),
                        layer_id)


class Performer(RotaryLM):
    def __init__(self, cfg: PerformerConfig):
        out_std = residual_scale(cfg.init_std, cfg.n_layers)
        super().__init__(cfg, lambda c, i: build_block(c, i, c.init_std, out_std), cfg.head_dim)
        # Training forward calls so far: drives the redraw schedule; saved with the weights.
        self.register_buffer("feature_calls", torch.zeros((), dtype=torch.int64))
        init_weights(self, cfg.init_std, out_std, ("wo", "w2"))

    def attention_layers(self) -> list[FavorSelfAttention]:
        return [m for m in self.modules() if isinstance(m, FavorSelfAttention)]

    @torch.no_grad()
    def redraw_features(self, draw: int) -> None:
        for attn in self.attention_layers():
            attn.redraw(draw)

    @contextlib.contextmanager
    def export_form(self):
        """Inside: the cache-free forward computes each layer's causal linear attention as ONE
        [T, T] chunk (`favor_causal_whole`): tensor ops on the input's shape, no Python loop over
        chunks, so a trace (ONNX export) holds for every sequence length. Same function as the
        chunked form; O(T^2) memory per head instead of O(T * chunk_size). Training, cached
        generation and everything outside the context keep the chunked form."""
        layers = self.attention_layers()
        before = [a.whole_sequence for a in layers]
        for a in layers:
            a.whole_sequence = True
        try:
            yield self
        finally:
            for a, b in zip(layers, before):
                a.whole_sequence = b

    def _count_training_call(self) -> None:
        every = self.cfg.redraw_every
        self.feature_calls += 1
        if every and int(self.feature_calls) % every == 0:  # NOTE: host sync on a CPU scalar only
            self.redraw_features(int(self.feature_calls) // every)

    def forward(self, tokens_BT: torch.Tensor, cache: PerformerCache | None = None, pos: int = 0) -> torch.Tensor:
        """tokens [B, T] (positions pos..pos+T-1) -> logits [B, T, vocab]."""
        T = tokens_BT.shape[1]
        self.check_length(pos, T)
        if cache is not None:
            if pos != cache.pos:  # prefix sums cannot rewind or skip positions
                raise ValueError(f"the Performer cache holds positions [0, {cache.pos}); got pos={pos}")
            cache.pos = pos + T
        if self.training:
            self._count_training_call()
        return self.run(tokens_BT, cache, pos)

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> PerformerCache:
        """A fresh recurrent state (its size does not depend on `max_len`, accepted for the common interface)."""
        check_causal_routing(self.cfg.moe)
        return PerformerCache(self.cfg.n_layers)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * active matmul params + 6 * FAVOR+'s multiply-adds per token."""
        cfg = self.cfg
        n = active_matmul_params(self)
        M, D, L = cfg.nb_features, cfg.head_dim, min(cfg.chunk_size, seq_len)
        # per head: q and k features (2MD), in-chunk scores and values (L(M+D)), state update and read (2MD)
        favor = cfg.n_heads * (2 * M * D + L * (M + D) + 2 * M * D)
        return 6 * n + 6 * cfg.n_layers * favor


PRESETS = {
    "debug": dict(max_seq_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, nb_features=16, chunk_size=16,
                  redraw_every=10),
    "small": dict(max_seq_len=256, d_model=256, n_layers=4, n_heads=4, nb_features=128, chunk_size=64,
                  redraw_every=100),
}

register("performer", PerformerConfig, Performer, PRESETS)
