"""The dense transformer: shapes, causality, local attention, activation checkpointing, KV cache."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import archs
from archs.common import local_attention
from archs.sampling import filter_logits, generate
from archs.transformer import PRESETS, TransformerConfig
from parallel.data_parallel import apply_activation_checkpointing


def make(**kw):
    torch.manual_seed(0)
    cfg = TransformerConfig(**{**PRESETS["debug"], "vocab_size": 97, **kw})
    return archs.build(cfg)


@pytest.mark.parametrize("kw", [{}, {"attn_window": 8}, {"n_kv_heads": 2}, {"tie_embeddings": False}])
def test_shapes(kw):
    model = make(**kw)
    logits = model(torch.randint(0, 97, (3, 40)))
    assert logits.shape == (3, 40, 97)
    assert (model.head is None) == model.cfg.tie_embeddings


def test_presets_build():
    for name, preset in PRESETS.items():
        model = archs.build(TransformerConfig(**preset, vocab_size=257))
        assert model.flops_per_token(preset["max_seq_len"]) > 0, name


@pytest.mark.parametrize("window", [None, 5])
def test_causality(window):
    """Changing token t never changes logits before t."""
    model = make(attn_window=window)
    x = torch.randint(0, 97, (2, 48))
    base = model(x)
    for t in (0, 17, 47):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 97
        out = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("T, W", [(50, 7), (64, 16), (16, 16), (10, 32), (33, 1)])
def test_local_attention_equals_masked_full_attention(T, W):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8, requires_grad=True) for _ in range(3))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < W))
    out = local_attention(q, k, v, W)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    g_out = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_local_window_model_equals_full_model_when_window_covers_sequence():
    full, local = make(), make(attn_window=64)
    x = torch.randint(0, 97, (2, 64))
    torch.testing.assert_close(local(x), full(x))


PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from archs.common import local_attention
    import torch.nn.functional as F
    T, W, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    q, k, v = (torch.randn(1, 1, T, 16) for _ in range(3))
    local_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], W)  # warm up allocator and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if mode == "local":
            out = local_attention(q, k, v, W)
        else:
            i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < W))
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
""")


def test_local_attention_memory_is_linear_in_sequence_length():
    """At T=16384 a [T, T] fp32 score matrix alone is 1 GiB; the blockwise path stays far below."""
    T, W = 16384, 128
    run = lambda mode: int(subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(T), str(W), mode],
                                          capture_output=True, text=True, check=True).stdout)
    scores_bytes = T * T * 4
    local_peak = run("local")
    assert local_peak < scores_bytes / 20, f"local attention peak grew by {local_peak / 2**20:.0f} MiB"
    # The masked dense form really does pay for the T x T matrix: the comparison is meaningful.
    assert run("masked") > scores_bytes / 2


def test_sequence_longer_than_model_is_rejected():
    model = make()
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=64"):
        model(torch.randint(0, 97, (1, 65)))


@pytest.mark.parametrize("window", [None, 6])
def test_activation_checkpointing_gives_equal_gradients(window):
    x = torch.randint(0, 97, (2, 32))
    plain, ckpt = make(attn_window=window), apply_activation_checkpointing(make(attn_window=window))
    assert set(plain.state_dict()) == set(ckpt.state_dict())  # checkpoint keys unchanged
    for m in (plain, ckpt):
        F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    wrapped = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in ckpt.named_parameters()}
    assert any("_checkpoint_wrapped_module" in k for k, _ in ckpt.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(wrapped[name].grad, p.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [{}, {"attn_window": 6}, {"n_kv_heads": 1}])
def test_kv_cache_decoding_equals_full_forward(kw):
    model = make(**kw).eval()
    x = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        steps = [model(x[:, :20], cache=cache, pos=0)]
        steps += [model(x[:, t:t + 1], cache=cache, pos=t) for t in range(20, 44)]
        steps += [model(x[:, 44:], cache=cache, pos=44)]  # a multi-token chunk after the prefill
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_cached_generation_equals_uncached(window):
    model = make(attn_window=window)
    prompt = torch.randint(0, 97, (2, 9))
    greedy = [generate(model, prompt, 30, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = [generate(model, prompt, 30, temperature=0.9, top_k=20, top_p=0.9,
                        generator=torch.Generator().manual_seed(3), use_cache=c) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=64"):
        generate(model, prompt, 60)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    p = logits.softmax(-1)[0]  # ~[0.64, 0.24, 0.09, 0.03]
    kept = ~torch.isinf(filter_logits(logits, top_p=float(p[0] + 0.01)))
    assert kept.tolist() == [[True, True, False, False]]
