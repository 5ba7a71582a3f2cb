"""Forecasters: the RNN-transformer hybrid (truncated BPTT) and the plain transformer baseline."""
import pytest
import torch

import archs
from archs.forecast import (RNN_PRESETS, TS_PRESETS, Forecaster, RNNTransformerConfig, TSTransformerConfig,
                            run_rnn_truncated)
from moe.config import MoEConfig
from moe.layer import MoELayer

ARCHS = {"rnn_transformer": (RNNTransformerConfig, RNN_PRESETS), "ts_transformer": (TSTransformerConfig, TS_PRESETS)}


def make(arch: str, seed: int = 0, preset: str = "debug", **kw) -> Forecaster:
    torch.manual_seed(seed)
    cls, presets = ARCHS[arch]
    if isinstance(kw.get("moe"), dict):
        kw["moe"] = MoEConfig(**kw["moe"])
    return Forecaster(cls(**{**presets[preset], "n_channels": 1, **kw}))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_window_checks(arch, channels):
    model = make(arch, n_channels=channels)
    cfg = model.cfg
    assert cfg.max_seq_len == cfg.context_len
    x = torch.randn(5, cfg.context_len, channels)
    assert model(x).shape == (5, cfg.horizon, channels)
    assert model(x[:, -7:]).shape == (5, cfg.horizon, channels)  # a shorter window is fine
    with pytest.raises(ValueError, match="context_len"):
        model(torch.randn(2, cfg.context_len + 1, channels))
    with pytest.raises(ValueError, match="n_channels"):
        model(torch.randn(2, cfg.context_len, channels + 1))


def test_registered_with_presets_and_n_channels_from_data():
    for name in ARCHS:
        fam = archs.family(name)
        assert set(fam.presets) >= {"debug", "small"}
        with pytest.raises(ValueError, match="n_channels is null"):
            fam.build(fam.config_cls(**fam.presets["debug"]))
        model = fam.build(fam.config_cls(**fam.presets["debug"], n_channels=2))
        assert model(torch.randn(1, model.cfg.context_len, 2)).shape == (1, model.cfg.horizon, 2)


@pytest.mark.parametrize("preset", ["debug", "small"])
def test_baseline_is_the_same_size_as_the_hybrid(preset):
    n = {arch: sum(p.numel() for p in make(arch, preset=preset).parameters()) for arch in ARCHS}
    assert abs(n["ts_transformer"] - n["rnn_transformer"]) <= 0.1 * n["rnn_transformer"], n


@pytest.mark.parametrize("kw, message", [
    ({"tbptt": 0}, "tbptt"), ({"rnn_layers": 0}, "rnn_layers"), ({"n_heads": 3}, "n_heads"),
    ({"dropout": 1.0}, "dropout"), ({"horizon": 0}, "horizon"), ({"n_channels": 0}, "n_channels"),
    ({"moe": {"num_experts": 2, "top_k": 1, "expert_hidden": 8}, "moe_layers": [5]}, "moe_layers"),
])
def test_bad_config_names_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        make("rnn_transformer", **kw)


@pytest.mark.parametrize("rnn, layers", [("gru", 1), ("lstm", 2)])
def test_tbptt_truncates_the_gradient_through_the_state(rnn, layers):
    """d rnn_out[t] / d x[s] is exactly zero for s before t's segment start, non-zero from it to t."""
    tbptt, L = 4, 14
    model = make("rnn_transformer", rnn=rnn, rnn_layers=layers, tbptt=tbptt, context_len=L).double()
    x = torch.randn(2, L, 1, dtype=torch.float64, requires_grad=True)
    out = model.encode(x)
    for t in range(L):
        (grad,) = torch.autograd.grad(out[:, t].sum(), x, retain_graph=True)
        per_step = grad.abs().sum(dim=(0, 2))
        start = t // tbptt * tbptt
        assert (per_step[:start] == 0).all(), f"t={t}: gradient crosses the segment boundary at {start}"
        assert (per_step[start:t + 1] > 0).all(), f"t={t}: no gradient inside its own segment"
        assert (per_step[t + 1:] == 0).all(), f"t={t}: the RNN read the future"


def test_full_bptt_reaches_the_start_and_truncation_keeps_the_values():
    """tbptt changes gradients only: forward values equal one pass over the window; without
    truncation the gradient of the last step reaches the first."""
    truncated = make("rnn_transformer", rnn="lstm", rnn_layers=2, tbptt=3)
    full = make("rnn_transformer", rnn="lstm", rnn_layers=2, tbptt=None)
    full.load_state_dict(truncated.state_dict())
    x = torch.randn(3, truncated.cfg.context_len, 1, requires_grad=True)
    torch.testing.assert_close(truncated.encode(x), full.encode(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(truncated(x), full(x), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(full.encode(x)[:, -1].sum(), x)
    assert (grad[:, 0].abs() > 0).all()
    # run_rnn_truncated with a horizon past the window is the plain call.
    torch.testing.assert_close(run_rnn_truncated(full.rnn, x, 1000), full.rnn(x)[0])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_step_of_the_window_affects_the_forecast(arch):
    """The transformer fuses the whole window: even under truncation the first step matters."""
    model = make(arch)
    x = torch.randn(2, model.cfg.context_len, 1, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    assert (grad.abs().sum(dim=(0, 2)) > 0).all()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_moe_ffns_from_config(arch):
    model = make(arch, n_layers=2, moe={"num_experts": 4, "top_k": 2, "expert_hidden": 16}, moe_every=2)
    moe = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert [m.layer_id for m in moe] == model.cfg.moe_layer_ids == [1]
    x = torch.randn(3, model.cfg.context_len, 1)
    y = model(x)
    assert y.shape == (3, model.cfg.horizon, 1)
    assert int(moe[0].last_counts_E.sum()) == 3 * model.cfg.context_len * 2
    y.square().mean().backward()
    assert moe[0].experts.w13.grad is not None
    # flops count the top_k experts a step runs, not all four: one more expert per step is 6x its weights.
    top1 = make(arch, n_layers=2, moe={"num_experts": 4, "top_k": 1, "expert_hidden": 16}, moe_every=2)
    per_expert = moe[0].experts.w13[0].numel() + moe[0].experts.w2[0].numel()
    assert model.flops_per_token(32) - top1.flops_per_token(32) == pytest.approx(6 * per_expert)


def sine_windows(n: int, L: int, H: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of noisy sines with random phase and period: inputs [n, L, 1], next H steps [n, H, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(L + H, dtype=torch.float32)
    period = 8 + 8 * torch.rand(n, 1, generator=g)
    phase = 6.3 * torch.rand(n, 1, generator=g)
    series = torch.sin(2 * torch.pi * t / period + phase) + 0.05 * torch.randn(n, L + H, generator=g)
    return series[:, :L, None], series[:, L:, None]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_debug_preset_trains(arch):
    model = make(arch)
    cfg = model.cfg
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x_val, y_val = sine_windows(64, cfg.context_len, cfg.horizon, seed=99)
    with torch.no_grad():
        before = (model(x_val) - y_val).abs().mean().item()
    for step in range(40):
        x, y = sine_windows(32, cfg.context_len, cfg.horizon, seed=step)
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = (model(x_val) - y_val).abs().mean().item()
    assert after < 0.6 * before, (before, after)
