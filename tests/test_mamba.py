"""Mamba (selective SSM) and MoE-Mamba: chunked scan vs recurrence, recurrent generation, causality, training."""
import pytest
import torch
import torch.nn.functional as F

from archs.common import SwiGLU
from archs.mamba import (PRESETS, Mamba, MambaConfig, scan_functions, selective_scan_chunked, selective_scan_ref,
                         selective_scan_step)
from archs.sampling import generate
from moe.config import MoEConfig
from moe.layer import MoELayer
from parallel.data_parallel import apply_activation_checkpointing
from tests.conftest import train_fixed_batch

MOE = dict(num_experts=4, top_k=2, expert_hidden=32, capacity_factor=1.25)


def make(seed=0, **kw) -> Mamba:
    torch.manual_seed(seed)
    if isinstance(kw.get("moe"), dict):
        kw["moe"] = MoEConfig(**kw["moe"])
    return Mamba(MambaConfig(**{**PRESETS["debug"], "vocab_size": 97, **kw}))


def scan_inputs(B=2, T=37, H=3, P=4, N=5, dtype=torch.float32, dt_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(B, T, H, generator=g, dtype=dtype)) * dt_scale
    A = -torch.rand(H, generator=g, dtype=dtype) * 4 - 0.5
    Bm, Cm = (torch.randn(B, T, N, generator=g, dtype=dtype) for _ in range(2))
    state = torch.randn(B, H, P, N, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, dt, A, Bm, Cm, state)]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("chunk", [1, 8, 16, 37, 64])
def test_chunked_scan_equals_sequential_recurrence(dtype, tol, chunk):
    """Outputs, final state and every input's gradient (initial state included) agree."""
    inputs = scan_inputs(dtype=dtype)
    y, h = selective_scan_chunked(*inputs, chunk=chunk)
    y_ref, h_ref = selective_scan_ref(*inputs)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(h, h_ref, rtol=tol, atol=tol)
    probe_y, probe_h = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y * probe_y).sum() + (h * probe_h).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * probe_y).sum() + (h_ref * probe_h).sum(), inputs)
    for name, a, b in zip(("x", "dt", "A", "B", "C", "state"), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=10 * tol, msg=f"gradient of {name}")


def test_chunked_scan_is_stable_for_large_decays():
    """dt * A down to about -190 per step: every exponent the chunked scan takes is <= 0."""
    inputs = scan_inputs(T=64, dt_scale=30.0)
    y, h = selective_scan_chunked(*inputs, chunk=32)
    y_ref, h_ref = selective_scan_ref(*inputs)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


def test_scan_functions_share_one_contract():
    fns = scan_functions()
    assert {"chunked", "sequential"} <= set(fns)
    x, dt, A, Bm, Cm, _ = (t.detach() for t in scan_inputs(T=20))
    outs = [fns[name](x, dt, A, Bm, Cm) for name in ("chunked", "sequential")]
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    # One step of the recurrence is the sequential scan over a single position.
    y1, h1 = selective_scan_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], torch.zeros_like(outs[0][1]))
    torch.testing.assert_close(y1, outs[1][0][:, 0])


@pytest.mark.parametrize("kw, ffn_layers, moe_layers", [
    ({}, [], []),                                        # pure Mamba: no FFN anywhere
    ({"dense_ffn": True}, [0, 1], []),                   # Mamba + dense SwiGLU after every block
    ({"moe": MOE}, [0, 1], [0, 1]),                      # MoE-Mamba: MoE after every block
    ({"moe": MOE, "n_layers": 4, "moe_every": 2}, [1, 3], [1, 3]),
    ({"moe": MOE, "n_layers": 4, "moe_every": 2, "dense_ffn": True}, [0, 1, 2, 3], [1, 3]),
])
def test_shapes_and_ffn_slots(kw, ffn_layers, moe_layers):
    model = make(**kw)
    assert model(torch.randint(0, 97, (3, 40))).shape == (3, 40, 97)
    assert [int(i) for i, layer in model.layers.items() if layer.mlp is not None] == ffn_layers
    assert [m.layer_id for m in model.modules() if isinstance(m, MoELayer)] == model.cfg.moe_layer_ids == moe_layers
    dense = [int(i) for i, layer in model.layers.items() if isinstance(layer.mlp, SwiGLU)]
    assert dense == sorted(set(ffn_layers) - set(moe_layers))


def test_presets_build():
    sizes = {}
    for name, preset in PRESETS.items():
        model = Mamba(MambaConfig(**preset, vocab_size=256))
        sizes[name] = sum(p.numel() for p in model.parameters())
        assert model.flops_per_token(preset["max_seq_len"]) > 6 * (sizes[name] - 256 * preset["d_model"])
    assert 3.0e6 < sizes["small"] < 3.7e6  # about the `small` transformer's 3.27M


@pytest.mark.parametrize("field, value", [("head_dim", 24), ("d_state", 0), ("chunk_size", 0),
                                          ("dt_min", 0.0), ("moe_layers", [7])])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MambaConfig(**{**PRESETS["debug"], field: value})


@pytest.mark.parametrize("T", [48, 40])
def test_causality(T):
    model = make(dense_ffn=True)
    x = torch.randint(0, 97, (2, T))
    base = model(x)
    for t in (0, 17, T - 1):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 97
        out = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("kw", [{}, {"moe": MOE, "dense_ffn": True, "n_layers": 3, "moe_every": 2}])
def test_step_by_step_generation_equals_full_forward(kw):
    model = make(**kw).eval()
    x = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        steps = [model(x[:, :1], cache=cache, pos=0)]
        steps += [model(x[:, t:t + 1], cache=cache, pos=t) for t in range(1, 30)]  # recurrent steps
        steps += [model(x[:, 30:44], cache=cache, pos=30)]  # a chunk continuing from the state
        steps += [model(x[:, t:t + 1], cache=cache, pos=t) for t in range(44, 50)]
        with pytest.raises(ValueError, match="holds positions"):
            model(x[:, :1], cache=cache, pos=10)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    cfg = model.cfg  # constant-size state, whatever the length
    assert cache.ssm.shape == (cfg.n_layers, 2, cfg.n_heads, cfg.head_dim, cfg.d_state)
    assert cache.conv.shape == (cfg.n_layers, 2, cfg.d_inner + 2 * cfg.d_state, cfg.d_conv - 1)


def test_cached_generation_equals_uncached():
    model = make()
    prompt = torch.randint(0, 97, (2, 9))
    greedy = [generate(model, prompt, 30, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])


def test_activation_checkpointing_gives_equal_gradients():
    x = torch.randint(0, 97, (2, 32))
    plain, ckpt = make(moe=MOE), apply_activation_checkpointing(make(moe=MOE))
    assert set(plain.state_dict()) == set(ckpt.state_dict())
    for m in (plain, ckpt):
        F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    wrapped = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in ckpt.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(wrapped[name].grad, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw", [{}, {"moe": MOE}])
def test_debug_preset_trains(kw):
    """A few dozen AdamW steps on one fixed batch: the loss falls, pure Mamba and MoE-Mamba alike."""
    model = make(**kw)
    losses = train_fixed_batch(model, vocab=97)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("name, moe_ids", [("mamba", []), ("mamba_moe_debug", [0, 1])])
def test_job_configs_build(name, moe_ids):
    import archs
    from cluster.config.job import load_config

    job = load_config(name, ["model.vocab_size=256"])
    model = archs.build(job.model)
    assert isinstance(model, Mamba) and job.model.moe_layer_ids == moe_ids
    assert job.model.max_seq_len >= job.data.seq_len


# --- mamba_ssm: an explicit choice, never a silent switch ----------------------------------------

def test_mamba_ssm_is_opt_in_and_fails_loudly_on_cuda_where_it_does_not_import(monkeypatch):
    import types

    from archs import mamba

    assert MambaConfig().use_mamba_ssm is False  # the default runs the chunked scan everywhere
    monkeypatch.setattr(mamba, "_MAMBA_SSM", ["mamba_ssm.ops.triton.ssd_combined does not import (test)"])
    with pytest.raises(RuntimeError, match="use_mamba_ssm: false"):
        mamba._use_mamba_ssm(types.SimpleNamespace(is_cuda=True))
    assert mamba._use_mamba_ssm(torch.zeros(1)) is False  # CPU tensors: the chunked scan, asked or not
    model = Mamba(MambaConfig(**PRESETS["debug"], vocab_size=50, use_mamba_ssm=True))
    ref = Mamba(MambaConfig(**PRESETS["debug"], vocab_size=50))
    ref.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 50, (2, 24))
    torch.testing.assert_close(model(tokens), ref(tokens), rtol=0, atol=0)
    assert "mamba_ssm" not in scan_functions()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mamba_ssm runs on CUDA only (also checked by jobs.bench gpu, part e)")
def test_mamba_ssm_scan_equals_chunked_scan():
    fns = scan_functions()
    if "mamba_ssm" not in fns:
        pytest.skip("mamba_ssm does not import")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, P, N = 2, 256, 4, 32, 16
    x = torch.randn(B, T, H, P, device="cuda", generator=g)
    dt = F.softplus(torch.randn(B, T, H, device="cuda", generator=g) - 3)
    A = -torch.rand(H, device="cuda", generator=g) * 4 - 0.5
    Bm, Cm = (torch.randn(B, T, N, device="cuda", generator=g) for _ in range(2))
    y_ref, s_ref = fns["chunked"](x, dt, A, Bm, Cm, None, 64)
    y, s = fns["mamba_ssm"](x, dt, A, Bm, Cm, None, 64)
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(s.float(), s_ref, rtol=2e-3, atol=2e-3)
