"""Sparse attention: each pattern against dense attention under the same mask, causality, memory
at a long sequence (largest tensor recorded op by op), KV-cached decoding, training with and
without MoE layers, configs."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import archs
from archs.sampling import generate
from archs.sparse_attention import (PATTERNS, PRESETS, SparsePattern, SparseTransformerConfig, block_means,
                                    gathered_attention, learned_positions, sparse_attention)
from cluster.config.job import load_config
from moe.config import MoEConfig
from parallel.data_parallel import apply_activation_checkpointing

V = 97


def make(pattern="blockwise", seed=0, **kw):
    torch.manual_seed(seed)
    return archs.build(SparseTransformerConfig(**{**PRESETS["debug"], "pattern": pattern, "vocab_size": V, **kw}))


def dense_attention(q, k, v, allowed_TT, bias_BHTT=None):
    """The reference: softmax over a full [T, T] score matrix under an explicit mask."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias_BHTT is not None:
        logits = logits + bias_BHTT
    return logits.masked_fill(~allowed_TT, float("-inf")).softmax(-1) @ v


def dense_mask(p: SparsePattern, T: int) -> torch.Tensor:
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    if p.kind == "blockwise":
        return (j <= i) & (j // p.block_size >= i // p.block_size - p.prev_blocks)
    return (j <= i) & ((i - j < p.window) | (j < p.global_tokens))


def qkv(T, B=2, H=3, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3)]


def assert_same_with_grads(out, ref, inputs):
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T, bs, prev", [(40, 8, 2), (37, 8, 1), (16, 16, 0), (5, 8, 3), (64, 4, 5)])
def test_blockwise_equals_dense_attention_under_its_mask(T, bs, prev):
    p = SparsePattern("blockwise", bs, prev_blocks=prev)
    q, k, v = qkv(T)
    assert_same_with_grads(sparse_attention(q, k, v, p), dense_attention(q, k, v, dense_mask(p, T)), (q, k, v))


@pytest.mark.parametrize("T, bs, window, g", [(40, 8, 12, 2), (45, 8, 8, 0), (33, 16, 5, 7), (50, 4, 1, 3),
                                              (20, 8, 30, 25)])
def test_local_global_equals_dense_attention_under_its_mask(T, bs, window, g):
    p = SparsePattern("local_global", bs, window=window, global_tokens=g)
    q, k, v = qkv(T)
    assert_same_with_grads(sparse_attention(q, k, v, p), dense_attention(q, k, v, dense_mask(p, T)), (q, k, v))


@pytest.mark.parametrize("T, bs, top", [(40, 8, 2), (37, 4, 3), (8, 8, 1)])
def test_learned_equals_dense_attention_under_its_selection(T, bs, top):
    """Rebuild the [T, T] mask and gate bias from the selected blocks; the gathered form matches it."""
    p = SparsePattern("learned", bs, top_blocks=top)
    q, k, v = qkv(T)
    nb = -(-T // bs)
    kpos, bias = learned_positions(q[:, :, ::bs], block_means(k, bs), torch.arange(nb), p)
    B, H = q.shape[:2]
    bias_BHTT = torch.full((B, H, nb * bs, T + nb * bs), float("-inf"))
    for b in range(nb):  # scatter each query block's gathered keys into its rows of the dense matrix
        rows = slice(b * bs, (b + 1) * bs)
        cols = kpos[:, :, b].masked_fill(kpos[:, :, b] < 0, T + nb * bs - 1)
        bias_BHTT[:, :, rows] = bias_BHTT[:, :, rows].scatter(-1, cols[:, :, None].expand(-1, -1, bs, -1),
                                                               bias[:, :, b, None].expand(-1, -1, bs, -1))
    bias_BHTT = bias_BHTT[:, :, :T, :T]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    ref = dense_attention(q, k, v, (j <= i) & torch.isfinite(bias_BHTT), bias_BHTT.nan_to_num(neginf=0.0))
    assert_same_with_grads(sparse_attention(q, k, v, p), ref, (q, k, v))
    # Every query block keeps its own block and, after the first blocks, `top` earlier ones.
    allowed = torch.isfinite(bias_BHTT) & (j <= i)
    last = (nb - 1) * bs
    assert int(allowed[0, 0, last, :last].sum()) == min(top, nb - 1) * bs


def test_learned_scorer_gets_gradient_through_the_gate():
    """The gate bias is differentiable: it changes the gradient reaching the scoring query and keys."""
    T, bs = 32, 4
    p = SparsePattern("learned", bs, top_blocks=2)
    q, k, v = qkv(T, seed=1)
    nb = T // bs
    kpos, bias = learned_positions(q[:, :, ::bs], block_means(k, bs), torch.arange(nb), p)
    assert bias.requires_grad and bias.min() < 0
    qb = q.view(*q.shape[:2], nb, bs, -1)
    qpos = torch.arange(T).view(nb, bs)
    with_gate = torch.autograd.grad(gathered_attention(qb, k, v, qpos, kpos, bias).square().sum(), q)[0]
    no_gate = torch.autograd.grad(gathered_attention(qb, k, v, qpos, kpos, bias.detach()).square().sum(), q)[0]
    first = torch.arange(0, T, bs)
    diff = (with_gate - no_gate).abs()
    assert diff[:, :, first[2:]].min() > 0  # every block with earlier blocks to choose from: first query
    torch.testing.assert_close(diff[:, :, first[0] + 1:bs], torch.zeros_like(diff[:, :, 1:bs]))  # others: none


@pytest.mark.parametrize("pattern", PATTERNS)
def test_attention_is_causal(pattern):
    """Perturbing q, k or v at position t leaves every output before t bit-identical."""
    p = SparsePattern(pattern, 8, prev_blocks=2, window=10, global_tokens=3, top_blocks=2)
    q, k, v = (t.detach() for t in qkv(45))
    base = sparse_attention(q, k, v, p)
    for t in (0, 8, 17, 44):
        for which in range(3):
            inputs = [q.clone(), k.clone(), v.clone()]
            inputs[which][:, :, t] += 1.0
            out = sparse_attention(*inputs, p)
            torch.testing.assert_close(out[:, :, :t], base[:, :, :t], rtol=0, atol=0)
            if (t, which) != (0, 0):  # position 0 sees one key: its output is v[0] whatever its query
                assert not torch.allclose(out[:, :, t:], base[:, :, t:])


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage produced by any op (forward and backward) run under it."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.nbytes:
                self.nbytes, self.op = t.untyped_storage().nbytes(), func
        return out


def largest_allocation(fn, *inputs) -> int:
    with LargestAllocation() as rec:
        out = fn(*inputs)
        out.square().sum().backward()
    return rec.nbytes


def test_recorder_sees_a_dense_score_matrix():
    """The instrument works: the dense reference at T=1024 allocates a T x T fp32 matrix."""
    T = 1024
    q, k, v = qkv(T, B=1, H=1, D=16)
    p = SparsePattern("blockwise", 32, prev_blocks=2)
    assert largest_allocation(lambda *a: dense_attention(*a, dense_mask(p, T)), q, k, v) >= T * T * 4


@pytest.mark.parametrize("pattern", PATTERNS)
def test_memory_at_8192_tokens_is_linear(pattern):
    """At T=8192 a T x T fp32 score matrix is 256 MiB; no tensor of forward or backward exceeds
    a few T x S score blocks (S keys per query), here ~1/80 of it."""
    T, bs = 8192, 32
    p = SparsePattern(pattern, bs, prev_blocks=2, window=64, global_tokens=4, top_blocks=2)
    q, k, v = qkv(T, B=1, H=1, D=16)
    peak = largest_allocation(lambda *a: sparse_attention(*a, p), q, k, v)
    assert peak <= 2 * T * p.keys_per_query * 4, f"{pattern}: largest tensor {peak / 2**20:.1f} MiB"
    assert peak < T * T * 4 / 40


@pytest.mark.parametrize("pattern", PATTERNS)
def test_model_memory_at_8192_tokens_is_linear(pattern):
    T = 8192
    model = make(pattern, max_seq_len=T, n_layers=1, n_heads=2, block_size=32, window=64)
    x = torch.randint(0, V, (1, T))
    peak = largest_allocation(model, x)
    assert peak < T * T * 4 / 40, f"{pattern}: largest tensor {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2, "tie_embeddings": False}])
def test_shapes(pattern, kw):
    model = make(pattern, **kw)
    assert model(torch.randint(0, V, (3, 41))).shape == (3, 41, V)
    assert (model.head is None) == model.cfg.tie_embeddings


@pytest.mark.parametrize("pattern", PATTERNS)
def test_model_is_causal(pattern):
    model = make(pattern).eval()
    x = torch.randint(0, V, (2, 48))
    base = model(x)
    for t in (0, 8, 21, 47):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % V
        out = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 1}])
def test_kv_cache_decoding_equals_full_forward(pattern, kw):
    """Prefill that ends mid-block, single tokens across block boundaries, then a multi-token chunk."""
    model = make(pattern, **kw).eval()
    x = torch.randint(0, V, (2, 60))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        steps = [model(x[:, :13], cache=cache, pos=0)]
        steps += [model(x[:, t:t + 1], cache=cache, pos=t) for t in range(13, 35)]
        steps += [model(x[:, 35:], cache=cache, pos=35)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_cached_generation_equals_uncached(pattern):
    model = make(pattern)
    prompt = torch.randint(0, V, (2, 9))
    greedy = [generate(model, prompt, 40, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = [generate(model, prompt, 40, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(3),
                        use_cache=c) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])


def test_window_covering_the_sequence_equals_the_dense_transformer():
    """local_global with a window >= T is full causal attention: the dense model, same weights."""
    from archs.transformer import PRESETS as DENSE

    sparse = make("local_global", window=64, global_tokens=0)
    dense = archs.build(archs.family("transformer").config_cls(**DENSE["debug"], vocab_size=V))
    dense.load_state_dict(sparse.state_dict())
    x = torch.randint(0, V, (2, 64))
    torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("moe", [False, True])
def test_debug_preset_trains(pattern, moe):
    kw = {"moe": MoEConfig(num_experts=4, top_k=2, expert_hidden=32, capacity_factor=1.25)} if moe else {}
    model = make(pattern, **kw)
    assert (len(model.cfg.moe_layer_ids) == 2) == moe
    losses = train_losses(model)
    assert losses[-1] < 0.6 * losses[0], losses[::8]


def test_moe_slots():
    model = make("learned", n_layers=3, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16), moe_layers=[0, 2])
    kinds = [type(model.layers[str(i)].mlp).__name__ for i in range(3)]
    assert kinds == ["MoELayer", "SwiGLU", "MoELayer"]
    assert [model.layers[str(i)].mlp.layer_id for i in (0, 2)] == [0, 2]
    dense = make("learned", n_layers=3)
    assert 0 < model.flops_per_token(64) < dense.flops_per_token(64) * 2


@pytest.mark.parametrize("pattern", PATTERNS)
def test_activation_checkpointing_gives_equal_gradients(pattern):
    x = torch.randint(0, V, (2, 40))
    plain, ckpt = make(pattern), apply_activation_checkpointing(make(pattern))
    for m in (plain, ckpt):
        F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    wrapped = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in ckpt.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(wrapped[name].grad, p.grad, rtol=1e-6, atol=1e-7)


def test_flops_grow_with_keys_per_query_not_sequence():
    model = make("blockwise", max_seq_len=4096)
    assert model.flops_per_token(4096) == model.flops_per_token(1024)  # span capped at (prev+1)*block
    assert model.flops_per_token(8) < model.flops_per_token(1024)


@pytest.mark.parametrize("field, value, match", [
    ("pattern", "strided", "pattern: 'strided' is not one of"), ("block_size", 0, "block_size: must be >= 1"),
    ("window", 0, "window: must be >= 1"), ("global_tokens", -1, "global_tokens: must be >= 0"),
    ("top_blocks", 0, "top_blocks: must be >= 1"), ("moe_layers", [5], r"moe_layers: \[5\] outside"),
])
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        SparseTransformerConfig(**{**PRESETS["debug"], field: value,
                                   "moe": MoEConfig() if field == "moe_layers" else None})


@pytest.mark.parametrize("name, moe", [("sparse", False), ("sparse_moe_debug", True)])
def test_job_configs_load_and_build(name, moe):
    cfg = load_config(name, ["model.pattern=learned"]).model
    assert cfg.arch == "sparse_transformer" and cfg.pattern == "learned"
    assert bool(cfg.moe_layer_ids) == moe
    cfg.vocab_size = 257
    model = archs.build(cfg)
    assert model(torch.randint(0, 257, (1, 40))).shape == (1, 40, 257)
