"""The hourglass transformer: shapes, causality, factor 1 = the plain stack, cached decoding,
MoE slots, training with and without MoE layers, activation checkpointing, configs."""
import pytest
import torch
import torch.nn.functional as F

import archs
from archs.hourglass import PRESETS, HourglassConfig
from archs.sampling import generate
from archs.transformer import TransformerConfig
from cluster.config.job import load_config
from moe.config import MoEConfig
from parallel.data_parallel import apply_activation_checkpointing

V = 97
MOE = dict(num_experts=4, top_k=2, expert_hidden=32)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return archs.build(HourglassConfig(**{**PRESETS["debug"], "vocab_size": V, **kw}))


@pytest.mark.parametrize("kw", [{}, {"shorten_factor": 3, "pool": "mean", "upsample": "repeat"},
                                {"shorten_factor": 4, "n_pre_layers": 0, "n_post_layers": 2},
                                {"n_kv_heads": 2, "tie_embeddings": False}])
def test_shapes(kw):
    model = make(**kw)
    for T in (1, 5, 37, 64):  # lengths that are and are not multiples of k
        assert model(torch.randint(0, V, (3, T))).shape == (3, T, V)


def test_presets_build_and_the_middle_is_cheaper():
    for name, preset in PRESETS.items():
        cfg = HourglassConfig(**preset, vocab_size=257)
        model = archs.build(cfg)
        plain = archs.build(HourglassConfig(**{**preset, "shorten_factor": 1}, vocab_size=257))
        T = preset["max_seq_len"]
        assert 0 < model.flops_per_token(T) < plain.flops_per_token(T), name


@pytest.mark.parametrize("k", [1, 2, 3])
def test_causality(k):
    """Changing token t never changes logits before t (the shift right by k-1 at work)."""
    model = make(shorten_factor=k).eval()
    x = torch.randint(0, V, (2, 48))
    base = model(x)
    for t in (0, 5, 6, 17, 47):  # group starts, middles and ends for k = 2, 3
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % V
        out = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("k, T", [(2, 40), (3, 40), (4, 1)])
def test_middle_runs_on_the_shortened_sequence(k, T):
    model = make(shorten_factor=k)
    seen = []
    for i in model.mid_ids:
        model.layers[i].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    model(torch.randint(0, V, (2, T)))
    assert seen == [(2, -(-T // k), model.cfg.d_model)] * model.cfg.n_mid_layers


@pytest.mark.parametrize("kw", [{}, {"n_pre_layers": 2, "n_mid_layers": 1, "n_post_layers": 0},
                                {"moe": MoEConfig(**MOE), "moe_layers": [1, 2]}])
def test_factor_one_equals_the_plain_stack(kw):
    """k = 1: the same weights run as a dense transformer of n_pre + n_mid + n_post layers."""
    model = make(shorten_factor=1, **kw).eval()
    cfg = model.cfg
    plain = archs.build(TransformerConfig(max_seq_len=cfg.max_seq_len, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                          n_heads=cfg.n_heads, d_ff=cfg.d_ff, vocab_size=V))
    if cfg.moe is not None:  # the plain stack gets the same MoE layers in the same slots
        from moe.layer import MoELayer
        for i in cfg.moe_layer_ids:
            plain.layers[str(i)].mlp = MoELayer(cfg.d_model, cfg.moe, layer_id=i)
    plain.load_state_dict(model.state_dict())  # strict: the same parameters under the same names
    plain.eval()
    x = torch.randint(0, V, (2, 50))
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert not torch.allclose(make(shorten_factor=2, **kw).eval()(x), plain(x))  # the comparison has teeth


@pytest.mark.parametrize("kw", [{}, {"shorten_factor": 3, "pool": "mean", "upsample": "repeat"},
                                {"shorten_factor": 1}, {"n_kv_heads": 1, "n_pre_layers": 0},
                                {"moe": MoEConfig(**MOE, capacity_factor=0.5)}])
def test_kv_cache_decoding_equals_full_forward(kw):
    """Prefill ending mid-group, single tokens across group boundaries, then a multi-token chunk."""
    model = make(**kw).eval()
    x = torch.randint(0, V, (2, 50))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        steps = [model(x[:, :7], cache=cache, pos=0)]
        steps += [model(x[:, t:t + 1], cache=cache, pos=t) for t in range(7, 30)]
        steps += [model(x[:, 30:35], cache=cache, pos=30), model(x[:, 35:], cache=cache, pos=35)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cached_generation_equals_uncached():
    model = make(shorten_factor=3)
    prompt = torch.randint(0, V, (2, 8))
    greedy = [generate(model, prompt, 40, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = [generate(model, prompt, 40, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(3),
                        use_cache=c) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])
    with pytest.raises(ValueError, match="expert-choice routing is non-causal"):
        make(moe=MoEConfig(**MOE, router="expert_choice", capacity_factor=1.0)).new_cache(1)


def test_moe_slots_are_unique_across_resolutions():
    model = make(n_pre_layers=2, n_mid_layers=2, n_post_layers=2, moe=MoEConfig(**MOE), moe_every=2)
    assert model.cfg.moe_layer_ids == [1, 3, 5]  # one bottom, one middle, one top
    kinds = {i: type(model.layers[str(i)].mlp).__name__ for i in range(6)}
    assert [i for i, kind in kinds.items() if kind == "MoELayer"] == [1, 3, 5]
    assert [model.layers[str(i)].mlp.layer_id for i in (1, 3, 5)] == [1, 3, 5]
    dense = make(n_pre_layers=2, n_mid_layers=2, n_post_layers=2)
    assert dense.flops_per_token(64) < model.flops_per_token(64)  # top-2 of 4 experts of width 32 > d_ff 64


def train_losses(model, steps=40, lr=3e-3):
    """A plain loop on one fixed batch: AdamW, next-token cross-entropy (MoE aux losses ride along)."""
    torch.manual_seed(1)
    x = torch.randint(0, V, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("moe", [None, MoEConfig(**MOE, capacity_factor=1.25)])
def test_debug_preset_trains(moe):
    model = make(moe=moe)
    losses = train_losses(model)
    assert losses[-1] < 0.6 * losses[0], losses[::8]


def test_activation_checkpointing_gives_equal_gradients():
    x = torch.randint(0, V, (2, 33))
    plain, ckpt = make(), apply_activation_checkpointing(make())
    assert set(plain.state_dict()) == set(ckpt.state_dict())
    for m in (plain, ckpt):
        F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    wrapped = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in ckpt.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(wrapped[name].grad, p.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("field, value, match", [
    ("shorten_factor", 0, "shorten_factor: must be >= 1"), ("n_mid_layers", 0, "n_mid_layers: must be >= 1"),
    ("n_pre_layers", -1, "n_pre_layers: must be >= 0"), ("pool", "max", "pool: 'max' is not one of"),
    ("upsample", "attention", "upsample: 'attention' is not one of"), ("moe_layers", [4], r"moe_layers: \[4\] outside"),
])
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        HourglassConfig(**{**PRESETS["debug"], field: value, "moe": MoEConfig() if field == "moe_layers" else None})


@pytest.mark.parametrize("name, moe", [("hourglass", False), ("hourglass_moe_debug", True)])
def test_job_configs_load_and_build(name, moe):
    cfg = load_config(name).model
    assert cfg.arch == "hourglass" and bool(cfg.moe_layer_ids) == moe
    cfg.vocab_size = 257
    assert archs.build(cfg)(torch.randint(0, 257, (1, 40))).shape == (1, 40, 257)
