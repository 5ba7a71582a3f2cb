"""The Performer (FAVOR+ linear attention): prefix sums, softmax approximation, memory, redraw, cache, training."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from archs.performer import (PRESETS, Performer, PerformerConfig, favor_attention, favor_causal, favor_causal_ref,
                             feature_logits, orthogonal_gaussian)
from archs.sampling import generate
from moe.config import MoEConfig
from moe.layer import MoELayer
from parallel.data_parallel import apply_activation_checkpointing
from tests.conftest import train_fixed_batch

MOE = dict(num_experts=4, top_k=2, expert_hidden=32, capacity_factor=1.25)


def make(seed=0, **kw) -> Performer:
    torch.manual_seed(seed)
    if isinstance(kw.get("moe"), dict):
        kw["moe"] = MoEConfig(**kw["moe"])
    return Performer(PerformerConfig(**{**PRESETS["debug"], "vocab_size": 97, **kw}))


def random_logits(B=2, H=2, T=37, D=8, M=16, dtype=torch.float64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=dtype) * scale for _ in range(3))
    proj = orthogonal_gaussian(M, D, g).to(dtype)
    return feature_logits(q, proj), feature_logits(k, proj), v


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"moe": MOE}, {"moe": MOE, "moe_every": 2}])
def test_shapes_and_moe_slots(kw):
    model = make(**kw)
    assert model(torch.randint(0, 97, (3, 40))).shape == (3, 40, 97)
    moe_ids = [m.layer_id for m in model.modules() if isinstance(m, MoELayer)]
    assert moe_ids == model.cfg.moe_layer_ids == ([] if "moe" not in kw else [1] if kw.get("moe_every") else [0, 1])


def test_presets_build_with_transformer_sized_parameters():
    for name, preset in PRESETS.items():
        model = Performer(PerformerConfig(**preset, vocab_size=256))
        matmul_params = sum(p.numel() for p in model.parameters()) - 256 * preset["d_model"]  # less the embedding
        assert model.flops_per_token(preset["max_seq_len"]) > 6 * matmul_params, name
    # `small` holds exactly the matrices of the `small` transformer (3.27M with 256 tokens): only attention differs.
    from archs.transformer import PRESETS as T_PRESETS, Transformer, TransformerConfig
    small = sum(p.numel() for p in Performer(PerformerConfig(**PRESETS["small"], vocab_size=256)).parameters())
    ref = sum(p.numel() for p in Transformer(TransformerConfig(**T_PRESETS["small"], vocab_size=256)).parameters())
    assert small == ref


@pytest.mark.parametrize("field, value", [("n_heads", 5), ("nb_features", 0), ("chunk_size", 0),
                                          ("redraw_every", -1), ("moe_every", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PerformerConfig(**{**PRESETS["debug"], field: value})


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 64])
def test_chunked_prefix_sums_equal_per_step_recurrence(chunk):
    """Chunked causal prefix sums (with both stabilisers) = the plain per-position sums, in float64."""
    qlog, klog, v = random_logits()
    qlog.requires_grad_(), klog.requires_grad_(), v.requires_grad_()
    ref = favor_causal_ref(qlog, klog, v)
    out, _ = favor_causal(qlog, klog, v, chunk)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g_out = torch.autograd.grad(out.square().sum(), (qlog, klog, v))
    g_ref = torch.autograd.grad(ref.square().sum(), (qlog, klog, v))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_state_carries_over_between_calls():
    """Prefix sums continued from a returned state equal one call over the whole sequence."""
    qlog, klog, v = random_logits(T=50)
    whole, _ = favor_causal(qlog, klog, v, 8)
    parts, state = [], None
    for a, b in ((0, 13), (13, 14), (14, 41), (41, 50)):
        out, state = favor_causal(qlog[:, :, a:b], klog[:, :, a:b], v[:, :, a:b], 8, state)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=1e-12, atol=1e-12)


def test_stabilisers_keep_large_logits_finite():
    """Feature logits whose exp() overflows or underflows fp32 still give the float64 answer."""
    qlog, klog, v = random_logits(T=40, scale=2.0)
    g = torch.Generator().manual_seed(1)
    qlog = qlog + 200 * torch.rand(*qlog.shape[:3], 1, generator=g, dtype=qlog.dtype) - 100  # per query: cancels
    klog = klog + 40 * torch.randn(*klog.shape[:3], 1, generator=g, dtype=klog.dtype)  # per key: reweights keys
    assert qlog.max() > 89 and klog.max() > 89  # exp(89) is inf in fp32
    ref = favor_causal_ref(qlog, klog, v)  # float64 holds them
    assert not torch.isfinite(favor_causal_ref(qlog.float(), klog.float(), v.float())).all()
    for chunk in (1, 16):
        out, _ = favor_causal(qlog.float(), klog.float(), v.float(), chunk)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_error_to_softmax_attention_falls_as_features_grow():
    """Mean |FAVOR+ - exact causal softmax attention| over 8 seeds falls over 16 / 64 / 256 features."""
    errors = []
    for m in (16, 64, 256):
        per_seed = []
        for seed in range(8):
            g = torch.Generator().manual_seed(seed)
            q, k, v = (torch.randn(1, 2, 64, 16, generator=g) * 0.5 for _ in range(3))
            exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            approx, _ = favor_attention(q, k, v, orthogonal_gaussian(m, 16, g), chunk=16)
            per_seed.append((approx - exact).abs().mean())
        errors.append(float(torch.stack(per_seed).mean()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.5 * errors[0], errors  # ~1/sqrt(m): a factor 4 in m roughly halves it


def test_orthogonal_features_are_orthogonal_within_blocks():
    w = orthogonal_gaussian(40, 16, torch.Generator().manual_seed(0)).double()
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.t(), torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    assert w.shape == (40, 16)


@pytest.mark.parametrize("T", [48, 40])  # 40: the last chunk is partial
def test_causality(T):
    """Changing token t never changes logits before t (the key stabiliser only looks back)."""
    model = make().eval()  # eval: no redraw between the compared calls
    x = torch.randint(0, 97, (2, T))
    base = model(x)
    for t in (0, 17, T - 1):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 97
        out = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t:], base[:, t:])


class LargestAllocation(TorchDispatchMode):
    """Bytes of the largest tensor storage any op (forward or backward) produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_memory_is_linear_in_sequence_length():
    """At T=4096 no tensor of forward or backward is near T x T: the largest is O(T * max(m, L, D))."""
    T, D, M, L = 4096, 16, 32, 64
    q, k, v = (torch.randn(1, 1, T, D, requires_grad=True) for _ in range(3))
    proj = orthogonal_gaussian(M, D)
    with LargestAllocation() as probe:
        out, _ = favor_attention(q, k, v, proj, chunk=L)
        out.square().sum().backward()
    assert probe.largest <= 2 * T * max(M, L, D) * 4, probe.largest  # [T/L, L, L] scores are T * L floats
    assert probe.largest < T * T * 4 / 32
    # The whole model, forward and backward, at 4096 tokens: still nothing quadratic.
    model = make(max_seq_len=T)
    with LargestAllocation() as probe:
        logits = model(torch.randint(0, 97, (1, T)))
        F.cross_entropy(logits[0, :-1], torch.randint(0, 97, (T - 1,))).backward()
    assert probe.largest < T * T * 4 / 32, probe.largest


def test_redraw_schedule_is_deterministic_and_resumes_exactly():
    model = make(redraw_every=3)
    x = torch.randint(0, 97, (2, 20))
    initial = [a.proj.clone() for a in model.attention_layers()]
    projections = []
    for _ in range(7):
        model(x)
        projections.append(model.attention_layers()[0].proj.clone())
    assert int(model.feature_calls) == 7
    assert torch.equal(projections[0], initial[0]) and torch.equal(projections[1], initial[0])
    assert not torch.equal(projections[2], initial[0])  # redrawn at call 3 ...
    assert torch.equal(projections[3], projections[2]) and not torch.equal(projections[5], projections[4])  # ... and 6
    assert not torch.equal(model.attention_layers()[0].proj, model.attention_layers()[1].proj)  # per layer
    with torch.no_grad():
        model.eval()(x)
    assert int(model.feature_calls) == 7  # evaluation does not count

    # A fresh model (other init) loading the state dict continues on exactly the same schedule.
    resumed = make(seed=1, redraw_every=3)
    resumed.load_state_dict(model.state_dict())
    model.train()
    for _ in range(5):
        torch.testing.assert_close(resumed(x), model(x), rtol=0, atol=0)
    # Draws depend only on (feature_seed, layer, draw): an independent model reaches the same matrices.
    other = make(seed=2, redraw_every=3)
    for _ in range(12):
        other(x)
    for a, b in zip(other.attention_layers(), model.attention_layers()):
        assert torch.equal(a.proj, b.proj)


def test_activation_checkpointing_counts_one_call_and_gives_equal_gradients():
    x = torch.randint(0, 97, (2, 32))
    plain, ckpt = make(redraw_every=1), apply_activation_checkpointing(make(redraw_every=1))
    assert set(plain.state_dict()) == set(ckpt.state_dict())
    for m in (plain, ckpt):
        F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        assert int(m.feature_calls) == 1  # the recomputation in backward is not a new call
    wrapped = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in ckpt.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(wrapped[name].grad, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw", [{}, {"moe": MOE}])
def test_recurrent_decoding_equals_full_forward(kw):
    model = make(**kw).eval()
    x = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        steps = [model(x[:, :20], cache=cache, pos=0)]
        steps += [model(x[:, t:t + 1], cache=cache, pos=t) for t in range(20, 44)]
        steps += [model(x[:, 44:], cache=cache, pos=44)]
        with pytest.raises(ValueError, match="holds positions"):
            model(x[:, :1], cache=cache, pos=3)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    # The state is the same size after 50 tokens as after 1: O(1) per generated token.
    assert all(s.S_BHMD.shape == (2, 4, 16, 8) for s in cache.states)


def test_cached_generation_equals_uncached():
    model = make()
    prompt = torch.randint(0, 97, (2, 9))
    greedy = [generate(model, prompt, 30, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])


@pytest.mark.parametrize("kw", [{}, {"moe": MOE}])
def test_debug_preset_trains(kw):
    """A few dozen AdamW steps on one fixed batch: the loss falls (redraws included, every 10 calls)."""
    model = make(**kw)
    losses = train_fixed_batch(model, vocab=97)
    assert int(model.feature_calls) == 30
    assert losses[-1] < 0.6 * losses[0], losses


def test_checkpoint_resume_across_a_redraw_continues_exactly(tmp_path):
    """Through cluster.checkpoint (DCP): the projections and the call count travel with the weights."""
    from cluster import checkpoint

    x = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(0))

    def fresh(seed):
        model = make(seed=seed, redraw_every=3)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train(model, opt, steps):
        losses = []
        for _ in range(steps):
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    straight = train(*fresh(0), 8)
    model, opt = fresh(0)
    first = train(model, opt, 4)  # redrawn at call 3; the next redraw (call 6) happens after the resume
    checkpoint.save(tmp_path / "ckpt", model, opt, {"step": 4}, model.cfg, rank=0, world_size=1)
    model2, opt2 = fresh(123)
    checkpoint.load(tmp_path / "ckpt", model2, opt2, model2.cfg, rank=0, world_size=1)
    assert int(model2.feature_calls) == 4
    assert first + train(model2, opt2, 4) == straight


@pytest.mark.parametrize("name, moe_ids", [("performer", []), ("performer_moe_debug", [0, 1])])
def test_job_configs_build(name, moe_ids):
    import archs
    from cluster.config.job import load_config

    job = load_config(name, ["model.vocab_size=256"])
    model = archs.build(job.model)
    assert isinstance(model, Performer) and job.model.moe_layer_ids == moe_ids
    assert job.model.max_seq_len >= job.data.seq_len
