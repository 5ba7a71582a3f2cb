"""Time-series forecasters: an RNN-transformer hybrid and the plain transformer baseline.

    rnn_transformer:  x -> GRU/LSTM encoder (truncated BPTT) -> transformer blocks -> head -> y
    ts_transformer:   x -> linear input projection             -> transformer blocks -> head -> y

Both read a window x [B, L, C] (L <= context_len past steps of C channels, in the task's
normalised units) and predict the next `horizon` steps y [B, H, C]. The transformer blocks are the
shared pre-norm blocks (RoPE, causal attention, SwiGLU or MoE FFN): causal attention over a window
that is all past is a choice, not a need; it lets the last position summarise the whole window,
and the head reads that position only (nothing of the future is ever in the input: the task cuts
the windows).

Truncated backpropagation through time: the RNN runs over the window in segments of `tbptt`
steps, and the state handed from one segment to the next is detached. Forward values are exactly
those of one pass over the window; gradients through the recurrent state reach back at most to the
start of the current segment (the transformer above still mixes all positions, as it should).

Shape letters: B batch, L window length (time steps), C channels (series variables), H forecast
horizon, D model width, S segment length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn as nn

from archs.common import (
    Attention,
    PreNormBlock,
    RMSNorm,
    init_weights,
    residual_scale,
    rope_tables,
)
from archs.ffn import MoEOptions, active_matmul_params, make_ffn
from archs.registry import register


@dataclass
class TSTransformerConfig(MoEOptions):
    arch: Annotated[str, "architecture family (registry key)"] = "ts_transformer"
    context_len: Annotated[int, "time steps of history the model reads (the input window)"] = 64
    horizon: Annotated[int, "time steps the model predicts after the window"] = 16
    n_channels: Annotated[int | None, "series variables per time step; null takes it from the dataset"] = None
    d_model: Annotated[int, "model width"] = 64
    n_layers: Annotated[int, "transformer blocks"] = 2
    n_heads: Annotated[int, "attention heads; must divide d_model"] = 4
    d_ff: Annotated[int | None, "SwiGLU hidden width; null = 8/3 * d_model rounded up to a multiple of 64"] = None
    dropout: Annotated[float, "dropout on the encoded inputs and before the head (0 = off)"] = 0.0
    rope_theta: Annotated[float, "RoPE base frequency"] = 10000.0
    norm_eps: Annotated[float, "RMSNorm epsilon"] = 1e-5
    init_std: Annotated[float, "std of the normal weight init (linear layers; the RNN keeps torch's init)"] = 0.02

    def __post_init__(self):
        for name in ("context_len", "horizon", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide d_model={self.d_model}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"n_heads: head dim d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        if self.n_channels is not None and self.n_channels < 1:
            raise ValueError(f"n_channels: must be >= 1 or null (from the data), got {self.n_channels}")
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"d_ff: must be >= 1 or null, got {self.d_ff}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        self.check_moe(self.n_layers)  # FFN slot i is transformer block i

    @property
    def hidden(self) -> int:
        return self.d_ff or 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def max_seq_len(self) -> int:
        """The loop's name for the longest input: the window."""
        return self.context_len


@dataclass
class RNNTransformerConfig(TSTransformerConfig):
    arch: Annotated[str, "architecture family (registry key)"] = "rnn_transformer"
    rnn: Annotated[Literal["gru", "lstm"], "recurrent encoder cell"] = "gru"
    rnn_layers: Annotated[int, "stacked recurrent layers (hidden width d_model)"] = 1
    tbptt: Annotated[int | None, "truncated BPTT: the recurrent state is detached every this many steps; null = full BPTT"] = 16

    def __post_init__(self):
        super().__post_init__()
        if self.rnn_layers < 1:
            raise ValueError(f"rnn_layers: must be >= 1, got {self.rnn_layers}")
        if self.tbptt is not None and self.tbptt < 1:
            raise ValueError(f"tbptt: must be >= 1 or null (full backpropagation through time), got {self.tbptt}")


def run_rnn_truncated(rnn: nn.RNNBase, x_BLC: torch.Tensor, tbptt: int | None) -> torch.Tensor:
    """Per-step outputs [B, L, D] of a batch-first GRU/LSTM, its state detached every `tbptt` steps.

    Output t is the same value as one pass over the whole window gives; its gradient reaches inputs
    s with floor(s / tbptt) == floor(t / tbptt) only (through the state), i.e. segment starts are
    0, tbptt, 2 tbptt, ...
    """
    L = x_BLC.shape[1]
    if tbptt is None or tbptt >= L:
        return rnn(x_BLC)[0]
    state = None
    outs = []
    for start in range(0, L, tbptt):
        out_BSD, state = rnn(x_BLC[:, start:start + tbptt], state)
        outs.append(out_BSD)
        # NOTE: detaching here is the truncation: no gradient crosses a segment boundary via the state.
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    return torch.cat(outs, dim=1)


class Forecaster(nn.Module):
    """Encoder (`rnn` or a linear projection) -> pre-norm transformer blocks -> head on the last step."""

    def __init__(self, cfg: TSTransformerConfig):
        super().__init__()
        if cfg.n_channels is None:
            raise ValueError("model.n_channels is null: set it, or build through the job config, which takes it from the data")
        self.cfg = cfg
        D, C = cfg.d_model, cfg.n_channels
        if isinstance(cfg, RNNTransformerConfig):
            rnn_cls = nn.GRU if cfg.rnn == "gru" else nn.LSTM
            self.rnn = rnn_cls(C, D, num_layers=cfg.rnn_layers, batch_first=True)
            self.in_proj = None
        else:
            self.rnn = None
            self.in_proj = nn.Linear(C, D)
        self.drop = nn.Dropout(cfg.dropout)
        out_std = residual_scale(cfg.init_std, cfg.n_layers)
        self.layers = nn.ModuleDict({
            str(i): PreNormBlock(D, cfg.norm_eps, Attention(D, cfg.n_heads, cfg.n_heads),
                                 make_ffn(D, cfg.hidden, cfg, i, cfg.init_std, out_std), i)
            for i in range(cfg.n_layers)})
        self.norm = RMSNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.horizon * C)
        cos, sin = rope_tables(cfg.context_len, D // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, cfg.init_std, out_std, ("wo", "w2"))

    def encode(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """The per-step encoding that enters the transformer: [B, L, D]."""
        if self.rnn is not None:
            return run_rnn_truncated(self.rnn, x_BLC, self.cfg.tbptt)
        return self.in_proj(x_BLC)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """Window x [B, L, C] (L <= context_len) -> forecast [B, horizon, C]."""
        cfg = self.cfg
        if x_BLC.dim() != 3 or x_BLC.shape[2] != cfg.n_channels:
            raise ValueError(f"expected a window [batch, time, {cfg.n_channels} channels] (model.n_channels), "
                             f"got shape {tuple(x_BLC.shape)}")
        B, L, C = x_BLC.shape
        if L > cfg.context_len:
            raise ValueError(f"window of {L} steps exceeds model.context_len={cfg.context_len}; "
                             "cut the window or raise model.context_len")
        h_BLD = self.drop(self.encode(x_BLC.float()))
        cos, sin = self.rope_cos[:L], self.rope_sin[:L]
        for block in self.layers.values():
            h_BLD = block(h_BLD, cos, sin)
        last_BD = self.drop(self.norm(h_BLD[:, -1]))
        return self.head(last_BD).view(B, cfg.horizon, C)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per time step of a window of `seq_len` steps (forward + backward, approximate):
        6 x the matmul parameters every step runs (RNN, transformer, active experts), the head once per
        window, and the attention scores."""
        per_step = active_matmul_params(self, lambda name, p: p.dim() >= 2 and not name.startswith("head."))
        head = self.head.weight.numel()
        return 6 * per_step + 6 * head / seq_len + 12 * self.cfg.n_layers * self.cfg.d_model * seq_len


# ts_transformer's presets widen the FFN so that it holds as many parameters as the hybrid's GRU
# plus its FFN (within a few per cent, one channel; tests/test_forecast_archs.py checks 10%).
TS_PRESETS = {
    "debug": dict(context_len=32, horizon=8, d_model=32, n_layers=2, n_heads=4, d_ff=80),
    "small": dict(context_len=96, horizon=24, d_model=64, n_layers=2, n_heads=4, d_ff=224),
}
RNN_PRESETS = {
    "debug": dict(context_len=32, horizon=8, d_model=32, n_layers=2, n_heads=4, d_ff=64, rnn="gru", rnn_layers=1, tbptt=8),
    "small": dict(context_len=96, horizon=24, d_model=64, n_layers=2, n_heads=4, d_ff=192, rnn="gru", rnn_layers=1,
                  tbptt=24),
}

register("ts_transformer", TSTransformerConfig, Forecaster, TS_PRESETS)
register("rnn_transformer", RNNTransformerConfig, Forecaster, RNN_PRESETS)
