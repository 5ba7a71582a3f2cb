"""Mamba language model: selective state-space blocks, optionally interleaved with MoE FFNs (MoE-Mamba).

Each block is Mamba-2's mixer: one input projection gives the gate z, the input x, the
input-dependent B and C and a step size dt per head; x, B, C pass a causal depthwise conv; then the
selective scan

    h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T      (h: [H, P, N] per sequence)
    y_t = h_t C_t + D * x_t

with a scalar decay A per head (Mamba-2's restriction of Mamba-1's diagonal A, which is what lets
the chunked scan run on matmuls). The output is gated by silu(z), normalised and projected back.

Three implementations of the scan share one signature, `(x, dt, A, B, C, state) -> (y, state)`:
- `selective_scan_chunked` for training and prefill: within a chunk of L steps, the cumulative
  log-decay gives an [L, L] lower-triangular decay matrix that weights C_t B_s^T (Mamba-2's SSD
  "segsum" form); across chunks the state is carried by a loop over chunks (never over steps).
- `selective_scan_ref`: the sequential recurrence, one step at a time (tests and benchmark).
- `selective_scan_step`: one step for generation, O(1) time and memory per token.
- `selective_scan_whole` (zero state in, no state out): the whole sequence as one chunk, a
  [T, T] decay matrix and no loop; the export form that `Mamba.export_form()` selects so an ONNX
  trace holds for every length. O(T^2) memory per head: export and inference only.
`mamba_ssm`'s fused Triton scan replaces the chunked one only when asked (`use_mamba_ssm: true`)
and the tensors are on CUDA; asked for on CUDA where it does not import, the forward fails with
the reason instead of silently running the chunked scan. CPU tensors always take the chunked
scan (mamba_ssm is CUDA only), so a model trained with it still evaluates on CPU. Its parity with
the chunked scan is checked by `python -m jobs.bench gpu` (part e) and by a test that runs where
CUDA and mamba_ssm are present. `scan_functions()` lists the scans for benchmarks.

Shape letters: B batch, T time, C model width, E inner width (expand * C), H heads, P head dim
(E = H * P), N state size, L chunk length, K conv kernel, V vocabulary.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Annotated, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from archs.common import RMSNorm, init_weights, residual_scale
from archs.ffn import MoEOptions, active_matmul_params, check_causal_routing, make_ffn
from archs.registry import register

# ----------------------------------------------------------------------------------------------
# The selective scan
# ----------------------------------------------------------------------------------------------


def selective_scan_ref(x_BTHP: torch.Tensor, dt_BTH: torch.Tensor, A_H: torch.Tensor, B_BTN: torch.Tensor,
                       C_BTN: torch.Tensor, state_BHPN: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence itself, one time step per Python iteration: the reference for the others.

    x [B, T, H, P], dt [B, T, H] (> 0), A [H] (< 0), B and C [B, T, N], state [B, H, P, N] or None
    (zeros). Returns y [B, T, H, P] (without the D skip) and the final state.
    """
    Bsz, T, H, P = x_BTHP.shape
    h = state_BHPN if state_BHPN is not None else x_BTHP.new_zeros(Bsz, H, P, B_BTN.shape[-1])
    ys = []
    for t in range(T):
        y, h = selective_scan_step(x_BTHP[:, t], dt_BTH[:, t], A_H, B_BTN[:, t], C_BTN[:, t], h)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def selective_scan_step(x_BHP: torch.Tensor, dt_BH: torch.Tensor, A_H: torch.Tensor, B_BN: torch.Tensor,
                        C_BN: torch.Tensor, state_BHPN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence (generation): y [B, H, P] and the new state [B, H, P, N]."""
    decay_BH = torch.exp(dt_BH * A_H)
    inject_BHPN = (dt_BH[..., None] * x_BHP)[..., None] * B_BN[:, None, None, :]
    state_BHPN = decay_BH[..., None, None] * state_BHPN + inject_BHPN
    return torch.einsum("bhpn,bn->bhp", state_BHPN, C_BN), state_BHPN


def selective_scan_chunked(x_BTHP: torch.Tensor, dt_BTH: torch.Tensor, A_H: torch.Tensor, B_BTN: torch.Tensor,
                           C_BTN: torch.Tensor, state_BHPN: torch.Tensor | None = None,
                           chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scan as `selective_scan_ref`, in chunks of `chunk` steps (Mamba-2's SSD form).

    Every exponent is a difference of cumulative log-decays taken later-minus-earlier, so each
    factor lies in (0, 1]: no overflow whatever dt is. Cost O(T * L * (N + P) * H) for the
    intra-chunk part plus O(T/L * H * P * N) for the carried states; memory O(T * L * H).
    """
    Bsz, T, H, P = x_BTHP.shape
    N = B_BTN.shape[-1]
    L = max(1, min(chunk, T))
    nc = -(-T // L)
    pad = nc * L - T
    if pad:  # NOTE: padded steps have dt = 0: decay 1 and no input, so the final state is unchanged
        x_BTHP, dt_BTH = F.pad(x_BTHP, (0, 0, 0, 0, 0, pad)), F.pad(dt_BTH, (0, 0, 0, pad))
        B_BTN, C_BTN = F.pad(B_BTN, (0, 0, 0, pad)), F.pad(C_BTN, (0, 0, 0, pad))
    # Chunked layouts: heads before chunks so that matmuls batch over (batch, head, chunk).
    logdecay_BHcL = (dt_BTH * A_H).view(Bsz, nc, L, H).permute(0, 3, 1, 2)
    xdt_BHcLP = (x_BTHP * dt_BTH[..., None]).view(Bsz, nc, L, H, P).permute(0, 3, 1, 2, 4)
    B_BcLN, C_BcLN = B_BTN.view(Bsz, nc, L, N), C_BTN.view(Bsz, nc, L, N)
    cum_BHcL = logdecay_BHcL.cumsum(-1)

    # Within a chunk: y_t = sum_{s <= t} exp(cum_t - cum_s) (C_t . B_s) dt_s x_s.
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=x_BTHP.device).tril()
    seg_BHcLL = (cum_BHcL[..., :, None] - cum_BHcL[..., None, :]).masked_fill(~causal_LL, float("-inf"))
    scores_BcLL = C_BcLN @ B_BcLN.transpose(-1, -2)
    y_BHcLP = (seg_BHcLL.exp() * scores_BcLL[:, None]) @ xdt_BHcLP

    # Each chunk's own contribution to the state at its end, and its total decay.
    to_end_BHcL = (cum_BHcL[..., -1:] - cum_BHcL).exp()
    chunk_state_BHcPN = (xdt_BHcLP * to_end_BHcL[..., None]).transpose(-1, -2) @ B_BcLN[:, None]
    chunk_decay_BHc = cum_BHcL[..., -1].exp()

    # Across chunks: carry the state (a loop over chunks, never over time steps).
    h = state_BHPN if state_BHPN is not None else x_BTHP.new_zeros(Bsz, H, P, N)
    entering = []
    for c in range(nc):
        entering.append(h)
        h = chunk_decay_BHc[:, :, c, None, None] * h + chunk_state_BHcPN[:, :, c]
    entering_BHcPN = torch.stack(entering, dim=2)
    # The state entering chunk c reaches step t of the chunk decayed by exp(cum_t).
    y_BHcLP = y_BHcLP + (C_BcLN[:, None] @ entering_BHcPN.transpose(-1, -2)) * cum_BHcL.exp()[..., None]
    y_BTHP = y_BHcLP.permute(0, 2, 3, 1, 4).reshape(Bsz, nc * L, H, P)[:, :T]
    return y_BTHP, h


def selective_scan_whole(x_BTHP: torch.Tensor, dt_BTH: torch.Tensor, A_H: torch.Tensor, B_BTN: torch.Tensor,
                         C_BTN: torch.Tensor) -> torch.Tensor:
    """The scan from a zero state with the whole sequence as ONE chunk: the export form.

    y_t = sum_{s <= t} exp(sum_{s < k <= t} dt_k A) (C_t . B_s) dt_s x_s with the full [T, T]
    "segsum" decay matrix, built from tensor ops on the input's shape only (a causal mask from
    arange, a cumulative sum down the masked log-decays), so a trace holds for every length.
    Each exponent is a sum of log-decays <= 0, summed directly rather than as a difference of
    long cumulative sums. Returns y [B, T, H, P] (without the D skip); no final state. Costs
    O(T^2 * H) memory and O(T^2 * (N + H * P)) time instead of the chunked O(T * chunk): used for
    ONNX export and inference, never for training or generation.
    """
    T = x_BTHP.shape[1]
    pos = torch.arange(T, device=x_BTHP.device)
    causal_TT = pos[:, None] >= pos[None, :]
    below_TT = pos[:, None] > pos[None, :]
    logdecay_BHT = (dt_BTH * A_H).transpose(1, 2)
    # seg[t, s] = sum of log-decays over s < k <= t: entries k > s of column s, summed down to row t.
    seg_BHTT = (logdecay_BHT[..., :, None] * below_TT).cumsum(-2).masked_fill(~causal_TT, float("-inf"))
    xdt_BHTP = (x_BTHP * dt_BTH[..., None]).transpose(1, 2)
    scores_BTT = C_BTN @ B_BTN.transpose(-1, -2)
    return ((seg_BHTT.exp() * scores_BTT[:, None]) @ xdt_BHTP).transpose(1, 2)


def _mamba_ssm_scan(x_BTHP, dt_BTH, A_H, B_BTN, C_BTN, state_BHPN=None, chunk: int = 64):
    """`mamba_ssm`'s fused Triton SSD scan (CUDA only), same contract as `selective_scan_chunked`."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    x_BTHP, dt_BTH, B_BTGN, C_BTGN = (t.contiguous() for t in (x_BTHP, dt_BTH, B_BTN[:, :, None], C_BTN[:, :, None]))
    y, final = mamba_chunk_scan_combined(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, chunk,
                                         initial_states=state_BHPN, return_final_states=True)
    return y, final


_MAMBA_SSM: list[str | None] = []  # [None] if the scan imports, else [why not]; checked once


def mamba_ssm_unavailable_reason() -> str | None:
    """None if `mamba_ssm`'s Triton scan imports here, else why not."""
    if not _MAMBA_SSM:
        try:
            import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
            _MAMBA_SSM.append(None)
        except Exception as err:  # absent, or built against another torch/CUDA
            _MAMBA_SSM.append(f"mamba_ssm.ops.triton.ssd_combined does not import ({type(err).__name__}: {err})")
    return _MAMBA_SSM[0]


def _use_mamba_ssm(x: torch.Tensor) -> bool:
    """Asked for: True on CUDA tensors (RuntimeError if it does not import), False on CPU."""
    if not x.is_cuda:
        return False
    reason = mamba_ssm_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"model.use_mamba_ssm: true, but {reason}; install mamba_ssm (README \"GPU install\") "
                           "or set model.use_mamba_ssm: false for the chunked pure-torch scan")
    return True


def scan_functions() -> dict[str, Callable]:
    """Scan implementations by name, each `(x, dt, A, B, C, state=None) -> (y, final_state)`.

    `chunked` (training path, pure torch), `sequential` (the per-step recurrence), and
    `mamba_ssm` where that package imports (CUDA tensors only). Shapes: see `selective_scan_ref`.
    """
    fns: dict[str, Callable] = {"chunked": selective_scan_chunked, "sequential": selective_scan_ref}
    if mamba_ssm_unavailable_reason() is None:
        fns["mamba_ssm"] = _mamba_ssm_scan
    return fns


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@dataclass
class MambaConfig(MoEOptions):
    arch: Annotated[str, "architecture family (registry key)"] = "mamba"
    vocab_size: Annotated[int | None, "vocabulary size; null takes it from the dataset's metadata"] = None
    max_seq_len: Annotated[int, "longest sequence the model accepts (nothing positional limits it; kept for generation)"] = 256
    d_model: Annotated[int, "model width"] = 256
    n_layers: Annotated[int, "number of Mamba blocks"] = 8
    expand: Annotated[int, "inner width = expand * d_model"] = 2
    head_dim: Annotated[int, "scan head dim P; must divide expand * d_model (heads = inner width / P)"] = 64
    d_state: Annotated[int, "state size N per head dim"] = 64
    d_conv: Annotated[int, "causal depthwise conv kernel width"] = 4
    chunk_size: Annotated[int, "chunk length of the training scan (memory O(T * chunk) per head)"] = 64
    dt_min: Annotated[float, "initial step sizes are log-uniform in [dt_min, dt_max]"] = 1e-3
    dt_max: Annotated[float, "initial step sizes are log-uniform in [dt_min, dt_max]"] = 1e-1
    dense_ffn: Annotated[bool, "put a dense SwiGLU after every Mamba block not holding an MoE FFN (off: pure Mamba)"] = False
    d_ff: Annotated[int | None, "SwiGLU hidden width of dense FFNs; null = 8/3 * d_model rounded up to 64"] = None
    norm_eps: Annotated[float, "RMSNorm epsilon"] = 1e-5
    tie_embeddings: Annotated[bool, "share the input embedding with the output head"] = True
    init_std: Annotated[float, "std of the normal weight init"] = 0.02
    use_mamba_ssm: Annotated[bool, "use mamba_ssm's fused Triton scan on CUDA (an error if it does not import there); CPU always runs the chunked scan"] = False

    def __post_init__(self):
        for name in ("max_seq_len", "d_model", "n_layers", "expand", "head_dim", "d_state", "d_conv", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.d_inner % self.head_dim:
            raise ValueError(f"head_dim: {self.head_dim} does not divide the inner width "
                             f"expand * d_model = {self.d_inner}; pick a divisor")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min/dt_max: need 0 < dt_min <= dt_max, got {self.dt_min}/{self.dt_max}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {self.vocab_size}")
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"d_ff: must be >= 1 or null, got {self.d_ff}")
        self.check_moe(self.n_layers)  # FFN slot i follows Mamba block i

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def hidden(self) -> int:
        return self.d_ff or 64 * -(-(8 * self.d_model // 3) // 64)

    def has_ffn(self, slot: int) -> bool:
        return self.dense_ffn or slot in self.moe_layer_ids


class MambaCache:
    """Recurrent state for generation, constant in sequence length: per layer the last K-1 conv
    inputs [B, E + 2N, K-1] and the SSM state [B, H, P, N] (fp32)."""

    def __init__(self, cfg: MambaConfig, batch: int, dtype: torch.dtype, device: torch.device | str):
        conv_ch = cfg.d_inner + 2 * cfg.d_state
        self.conv = torch.zeros(cfg.n_layers, batch, conv_ch, cfg.d_conv - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(cfg.n_layers, batch, cfg.n_heads, cfg.head_dim, cfg.d_state,
                               dtype=torch.float32, device=device)
        self.pos = 0  # next position the cache expects


class MambaMixer(nn.Module):
    """x [B, T, C] -> [B, T, C]: projections, causal conv, selective scan, gate, norm, projection."""

    def __init__(self, cfg: MambaConfig, layer_id: int):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        E, N, H = cfg.d_inner, cfg.d_state, cfg.n_heads
        self.in_proj = nn.Linear(cfg.d_model, 2 * E + 2 * N + H, bias=False)  # z, x, B, C, dt
        self.conv = nn.Conv1d(E + 2 * N, E + 2 * N, cfg.d_conv, groups=E + 2 * N)  # depthwise; padded causally
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = RMSNorm(E, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(E, cfg.d_model, bias=False)
        self.whole_sequence = False  # export form (`Mamba.export_form`): one [T, T] chunk, no cache
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's init: dt log-uniform in [dt_min, dt_max] (through softplus), A in -[1, 16], D = 1."""
        cfg = self.cfg
        H = cfg.n_heads
        dt = torch.exp(torch.rand(H) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.empty(H).uniform_(1, 16)))
        self.D.fill_(1.0)

    def forward(self, x_BTC: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        cfg = self.cfg
        Bsz, T, _ = x_BTC.shape
        E, N, H, P, K = cfg.d_inner, cfg.d_state, cfg.n_heads, cfg.head_dim, cfg.d_conv
        z_BTE, xbc_BTX, dt_BTH = self.in_proj(x_BTC).split([E, E + 2 * N, H], dim=-1)

        # Causal depthwise conv: left context is the cached last K-1 inputs, or zeros.
        xbc_BXT = xbc_BTX.transpose(1, 2)
        left = cache.conv[self.layer_id] if cache is not None else xbc_BXT.new_zeros(Bsz, E + 2 * N, K - 1)
        padded_BXT = torch.cat([left.to(xbc_BXT.dtype), xbc_BXT], dim=-1)
        if cache is not None:
            cache.conv[self.layer_id] = padded_BXT[..., padded_BXT.shape[-1] - (K - 1):]
        xbc_BTX = F.silu(self.conv(padded_BXT)).transpose(1, 2)
        xs_BTE, B_BTN, C_BTN = xbc_BTX.split([E, N, N], dim=-1)

        # NOTE: the scan runs in fp32 under autocast: exp of cumulative log-decays needs the range.
        with torch.autocast(x_BTC.device.type, enabled=False):
            x_BTHP = xs_BTE.float().view(Bsz, T, H, P)
            dt_BTH = F.softplus(dt_BTH.float() + self.dt_bias.float())
            A_H = -torch.exp(self.A_log.float())
            B_BTN, C_BTN = B_BTN.float(), C_BTN.float()
            state = cache.ssm[self.layer_id] if cache is not None else None
            if cache is not None and T == 1:
                y_BHP, state = selective_scan_step(x_BTHP[:, 0], dt_BTH[:, 0], A_H, B_BTN[:, 0], C_BTN[:, 0], state)
                y_BTHP = y_BHP[:, None]
            elif self.whole_sequence and cache is None:
                y_BTHP = selective_scan_whole(x_BTHP, dt_BTH, A_H, B_BTN, C_BTN)
            elif cfg.use_mamba_ssm and _use_mamba_ssm(x_BTHP):
                y_BTHP, state = _mamba_ssm_scan(x_BTHP, dt_BTH, A_H, B_BTN, C_BTN, state, cfg.chunk_size)
            else:
                y_BTHP, state = selective_scan_chunked(x_BTHP, dt_BTH, A_H, B_BTN, C_BTN, state, cfg.chunk_size)
            if cache is not None:
                cache.ssm[self.layer_id] = state
            y_BTHP = y_BTHP + self.D.float()[:, None] * x_BTHP
        y_BTE = y_BTHP.reshape(Bsz, T, E).to(z_BTE.dtype)
        return self.out_proj(self.norm(y_BTE * F.silu(z_BTE)))


class MambaLayer(nn.Module):
    """Pre-norm residual Mamba block, then (in FFN slot `layer_id`, if it has one) a pre-norm FFN."""

    def __init__(self, cfg: MambaConfig, layer_id: int, ffn_std: float, ffn_out_std: float):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = MambaMixer(cfg, layer_id)
        self.mlp_norm = self.mlp = None
        if cfg.has_ffn(layer_id):
            self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.mlp = make_ffn(cfg.d_model, cfg.hidden, cfg, layer_id, ffn_std, ffn_out_std)

    def forward(self, x_BTC: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        x_BTC = x_BTC + self.mixer(self.mixer_norm(x_BTC), cache)
        if self.mlp is not None:
            x_BTC = x_BTC + self.mlp(self.mlp_norm(x_BTC))
        return x_BTC


class Mamba(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is null: set it, or build through the job config, which takes it from the data")
        self.cfg = cfg
        n_residual = cfg.n_layers + sum(cfg.has_ffn(i) for i in range(cfg.n_layers))
        out_std = residual_scale(cfg.init_std, n_residual / 2)  # std / sqrt(number of residual branches)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): MambaLayer(cfg, i, cfg.init_std, out_std) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # MoE layers initialised themselves in make_ffn; init_weights reaches only nn.Linear/Embedding.
        init_weights(self, cfg.init_std, out_std, ("out_proj", "w2"))

    def forward(self, tokens_BT: torch.Tensor, cache: MambaCache | None = None, pos: int = 0) -> torch.Tensor:
        """tokens [B, T] (positions pos..pos+T-1) -> logits [B, T, vocab]."""
        T = tokens_BT.shape[1]
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                             "shorten the input or raise model.max_seq_len (Mamba has no positional table)")
        if cache is not None:
            if pos != cache.pos:  # a recurrent state cannot rewind or skip: it only holds the past as a summary
                raise ValueError(f"the Mamba cache holds positions [0, {cache.pos}); got pos={pos}")
            cache.pos = pos + T
        x = self.embed(tokens_BT)
        for layer in self.layers.values():
            x = layer(x, cache)
        x = self.norm(x)
        return x @ self.embed.weight.t() if self.head is None else self.head(x)

    @contextlib.contextmanager
    def export_form(self):
        """Inside: the cache-free forward runs each layer's scan as ONE [T, T] chunk
        (`selective_scan_whole`): tensor ops on the input's shape, no Python loop over chunks, so a
        trace (ONNX export) holds for every sequence length. Same function as the chunked scan;
        O(T^2) memory per head instead of O(T * chunk_size). Training, cached generation and
        everything outside the context keep the chunked (or mamba_ssm) scan."""
        mixers = [m for m in self.modules() if isinstance(m, MambaMixer)]
        before = [m.whole_sequence for m in mixers]
        for m in mixers:
            m.whole_sequence = True
        try:
            yield self
        finally:
            for m, b in zip(mixers, before):
                m.whole_sequence = b

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> MambaCache:
        """A fresh recurrent state; `max_len` is accepted for the common interface (the state has fixed size)."""
        check_causal_routing(self.cfg.moe)
        p = self.embed.weight
        return MambaCache(self.cfg, batch, dtype or p.dtype, p.device)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * active matmul params + the scan (6x its forward multiply-adds)."""
        cfg = self.cfg
        # Matrices only: norms, dt/A/D vectors and the depthwise conv are not matmuls (the conv is in `scan`).
        n = active_matmul_params(self, lambda name, p: p.dim() >= 2 and "conv" not in name)
        L = min(cfg.chunk_size, seq_len)
        E, N, H = cfg.d_inner, cfg.d_state, cfg.n_heads
        # per token: C.B^T over a chunk (L*N), decay-weighted sum (L*E), chunk states (2*E*N), conv (K*(E+2N))
        scan = L * N + L * E + 2 * E * N + cfg.d_conv * (E + 2 * N) + 2 * H * L
        return 6 * n + 6 * cfg.n_layers * scan


PRESETS = {
    "debug": dict(max_seq_len=64, d_model=32, n_layers=2, expand=2, head_dim=16, d_state=8, chunk_size=16),
    # ~3.4M parameters with a 256-token vocabulary: two Mamba blocks per transformer block of `small`.
    "small": dict(max_seq_len=256, d_model=256, n_layers=8, expand=2, head_dim=64, d_state=64, chunk_size=64),
}

register("mamba", MambaConfig, Mamba, PRESETS)
