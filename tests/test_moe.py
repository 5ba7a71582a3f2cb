"""The MoE layer against plain references: routing and capacity properties, per-token reference,
dense equivalence, losses and their gradients, bias balancing, gradcheck, training and resume."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import archs
from archs.moe_transformer import PRESETS, MoETransformerConfig
from archs.sampling import generate
from cluster import checkpoint
from cluster.train.precision import DynamicLossScaler
from cluster.config.job import load_config
from cluster.train.optim import build_optimizer, build_scheduler
from cluster.train.step import train_step
from kernels import available_backends
from moe.config import MoEConfig
from moe.dispatcher import keep_order
from moe.layer import MoELayer
from moe.losses import load_balancing_loss, sequence_load_balancing_loss, z_loss
from moe.router import TopKRouter, capacity
from moe.layer import moe_layers
from moe.stats import finish_step
from tests.test_step import CPU, ArrayLM


def make_layer(d=16, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": 8, "aux_loss_coeff": 0.0,
                       "z_loss_coeff": 0.0, "backend": "loop", **kw})
    layer = MoELayer(d, cfg)
    layer.init_weights(0.3, 0.3)
    return layer


# ---------------------------------------------------------------- routing and capacity properties

@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 48), E=st.integers(1, 12), k=st.integers(1, 4),
       cf=st.sampled_from([None, 0.25, 0.5, 1.0, 1.5]), policy=st.sampled_from(["score", "position"]),
       seed=st.integers(0, 10_000))
def test_capacity_properties(N, E, k, cf, policy, seed):
    k = min(k, E)
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=cf, drop_policy=policy, min_capacity=1)
    routing = TopKRouter(8, cfg)(torch.randn(N, 8))
    C = capacity(N, cfg) if cf is not None else None
    order, sizes = keep_order(routing, C, policy)
    experts, tokens = routing.expert_A[order], routing.token_A[order]
    assert torch.equal(sizes, torch.bincount(experts, minlength=E))
    assert torch.all(experts[1:] >= experts[:-1])  # sorted by expert
    assert torch.bincount(tokens, minlength=N).max() <= k  # no token keeps more than k copies
    if C is None:
        assert order.numel() == N * k  # dropless keeps everything
        return
    assert sizes.max() <= C  # no expert exceeds C
    kept = torch.zeros(N * k, dtype=torch.bool)
    kept[order] = True
    for e in range(E):
        mine = routing.expert_A == e
        if (mine & ~kept).any():  # something was dropped: the expert is full
            assert (mine & kept).sum() == C
            if policy == "score":
                assert routing.priority_A[mine & kept].min() >= routing.priority_A[mine & ~kept].max()
            else:
                assert routing.token_A[mine & kept].max() <= routing.token_A[mine & ~kept].min()


def test_group_limited_routing_stays_in_the_best_groups():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, num_groups=4, group_topk=1)
    routing = TopKRouter(8, cfg)(torch.randn(64, 8))
    groups = (routing.expert_A // 2).view(64, 2)
    assert torch.equal(groups[:, 0], groups[:, 1])  # both choices inside the single allowed group


def test_capacity_formula():
    cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor=1.25, min_capacity=4)
    assert capacity(100, cfg) == math.ceil(1.25 * 100 * 2 / 8)
    assert capacity(4, cfg) == 4  # min_capacity


# ------------------------------------------------------------------- the layer against references

def per_token_reference(layer, x_NC):
    """Loop over tokens and experts: which copies survive capacity (highest score first, or
    earliest token first for drop_policy position), and
    out[t] = sum_kept weight * SwiGLU_e(x[t]) + shared(x[t])."""
    cfg = layer.cfg
    r = layer.router(x_NC)
    N = x_NC.shape[0]
    cap = capacity(N, cfg) if layer.training and cfg.capacity_factor is not None else None
    kept = set(range(r.expert_A.numel()))
    if cap is not None:
        for e in range(cfg.num_experts):
            mine = [a for a in range(r.expert_A.numel()) if r.expert_A[a] == e]
            by_score = cfg.drop_policy == "score"
            mine.sort(key=lambda a: (-float(r.priority_A[a]), a) if by_score else a)
            kept -= set(mine[cap:])
    out = torch.zeros_like(x_NC)
    w13, w2 = layer.experts.w13, layer.experts.w2
    for a in sorted(kept):
        t, e = int(r.token_A[a]), int(r.expert_A[a])
        g, u = (x_NC[t] @ w13[e]).chunk(2)
        out[t] += r.weight_A[a] * ((F.silu(g) * u) @ w2[e])
    if layer.shared is not None:
        out = out + layer.shared(x_NC)
    return out


@pytest.mark.parametrize("kw, train", [({}, False), ({"capacity_factor": 0.5}, True), ({"capacity_factor": 0.5}, False),
                                       ({"shared_expert_hidden": 8, "top_k": 1}, True),
                                       ({"score_func": "sigmoid", "top_k": 3}, True),
                                       ({"capacity_factor": 0.75, "drop_policy": "position"}, True)])
def test_layer_equals_per_token_reference(kw, train):
    layer = make_layer(**kw).train(train)
    x = torch.randn(3, 10, 16)
    got = layer(x)
    torch.testing.assert_close(got.view(-1, 16), per_token_reference(layer, x.view(-1, 16)), atol=1e-5, rtol=1e-5)


def test_one_expert_top1_equals_dense_swiglu():
    from archs.common import SwiGLU
    layer = make_layer(num_experts=1, top_k=1, expert_hidden=24)
    dense = SwiGLU(16, 24)
    with torch.no_grad():
        dense.w1.weight.copy_(layer.experts.w13[0, :, :24].t())
        dense.w3.weight.copy_(layer.experts.w13[0, :, 24:].t())
        dense.w2.weight.copy_(layer.experts.w2[0].t())
    x = torch.randn(2, 7, 16, requires_grad=True)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), dense(x), atol=1e-6, rtol=1e-5)
    gx_moe, = torch.autograd.grad(layer(x).square().sum(), x)
    gx_dense, = torch.autograd.grad(dense(x).square().sum(), x)
    torch.testing.assert_close(gx_moe, gx_dense, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", available_backends(torch.device("cpu"), torch.float32))
def test_every_backend_gives_the_same_layer(backend):
    # Widths are multiples of blocksparse's default block (128).
    ref = make_layer(d=128, expert_hidden=64, capacity_factor=1.0).train()
    other = make_layer(d=128, expert_hidden=64, capacity_factor=1.0).train()
    other.experts.backend = backend
    x = torch.randn(4, 16, 128)
    torch.testing.assert_close(other(x), ref(x), atol=1e-5, rtol=1e-4)
    g_ref = torch.autograd.grad(ref(x).square().sum(), list(ref.parameters()))
    g_other = torch.autograd.grad(other(x).square().sum(), list(other.parameters()))
    for a, b in zip(g_other, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gradcheck_float64():
    # Auxiliary losses off: their gradient is injected in backward, not a derivative of the output
    # (test_losses_equal_their_formulas_and_reach_the_router covers them).
    layer = make_layer(d=4, expert_hidden=3, num_experts=3).double().train()
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    params = [layer.router.gate.weight, layer.experts.w13, layer.experts.w2]

    def f(x, gate, w13, w2):
        out = torch.func.functional_call(layer, {"router.gate.weight": gate, "experts.w13": w13, "experts.w2": w2}, (x,))
        return out

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in params]), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------- losses

def test_losses_equal_their_formulas_and_reach_the_router():
    layer = make_layer(aux_loss_coeff=0.1, seq_aux_loss_coeff=0.05, z_loss_coeff=0.01).train()
    x = torch.randn(3, 8, 16)
    r = layer.router(x.view(-1, 16))
    N, E, k = 24, 4, 2
    f = torch.bincount(r.expert_A, minlength=E).float() / (N * k)
    torch.testing.assert_close(load_balancing_loss(r.probs_NE, r.expert_A, k), E * (f * r.probs_NE.mean(0)).sum())
    seq = []
    for b in range(3):
        rows = slice(8 * b, 8 * b + 8)
        fb = torch.bincount(r.expert_A.view(N, k)[rows].reshape(-1), minlength=E).float() / (8 * k)
        seq.append(E * (fb * r.probs_NE[rows].mean(0)).sum())
    torch.testing.assert_close(sequence_load_balancing_loss(r.probs_NE, r.expert_A, r.token_A, k, 8), torch.stack(seq).mean())
    torch.testing.assert_close(z_loss(r.logits_NE), (torch.logsumexp(r.logits_NE, -1) ** 2).mean())
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform, torch.arange(4).repeat(4), 2).item() == pytest.approx(1.0)

    # Backward through the layer output alone (zero task loss) delivers exactly the aux gradient.
    layer.aux_loss_scale = 1.0
    (layer(x) * 0).sum().backward()
    want = torch.autograd.grad(
        0.1 * load_balancing_loss(r.probs_NE, r.expert_A, k)
        + 0.05 * sequence_load_balancing_loss(r.probs_NE, r.expert_A, r.token_A, k, 8)
        + 0.01 * z_loss(r.logits_NE), layer.router.gate.weight)[0]
    assert layer.router.gate.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.router.gate.weight.grad, want, atol=1e-6, rtol=1e-5)


def test_aux_loss_scale_multiplies_the_aux_gradient():
    grads = []
    for scale in (1.0, 3.0):
        layer = make_layer(aux_loss_coeff=0.1).train()
        layer.aux_loss_scale = scale
        (layer(torch.ones(1, 4, 16)) * 0).sum().backward()
        grads.append(layer.router.gate.weight.grad)
    torch.testing.assert_close(grads[1], 3 * grads[0])


def test_bias_balancing_drives_a_skewed_router_to_uniform_load():
    def run(rate):
        layer = make_layer(num_experts=8, top_k=2, bias_update_rate=rate).train()
        with torch.no_grad():
            layer.router.gate.weight[0] += 0.3  # with inputs of mean +1, expert 0 wins most tokens
        gen = torch.Generator().manual_seed(0)
        imbalance = []
        for _ in range(300):
            with torch.no_grad():
                layer(torch.randn(1, 1024, 16, generator=gen) + 1.0)
            imbalance.append(finish_step([layer], CPU)["layers"][0]["imbalance"])
        return layer, imbalance

    _, fixed = run(0.0)
    layer, balanced = run(5e-3)
    assert fixed[0] > 3.5 and np.mean(fixed[-50:]) > 3.5  # no balancing: max load 4x the mean
    # Sign updates keep jittering around balance; max/mean of 8 experts x 256 tokens ~1.3 at best.
    assert np.mean(balanced[-50:]) < 1.45
    assert layer.router.expert_bias[0] < 0  # the hot expert was pushed down


def test_statistics_count_before_dropping_and_the_dropped_share():
    layer = make_layer(capacity_factor=0.5, min_capacity=1).train()
    for _ in range(2):
        layer(torch.randn(2, 8, 16))
    s = finish_step([layer], CPU)["layers"][0]
    assert sum(s["tokens_per_expert"]) == 2 * 16 * 2  # two forwards of 16 tokens x top-2
    C = capacity(16, layer.cfg)
    assert s["dropped_frac"] >= 1 - 4 * C / 32 - 1e-9
    assert 0 < s["router_entropy"] <= math.log(4)
    assert finish_step([layer], CPU)["layers"][0]["tokens_per_expert"] == [0.0] * 4  # reset each step


def test_expert_choice_balances_by_construction_and_cannot_generate():
    layer = make_layer(router="expert_choice", capacity_factor=1.0).train()
    layer(torch.randn(2, 8, 16)).sum().backward()
    s = finish_step([layer], CPU)["layers"][0]
    assert len(set(s["tokens_per_expert"])) == 1 and layer.router.gate.weight.grad.abs().sum() > 0
    cfg = MoETransformerConfig(**{**PRESETS["debug"], "moe": MoEConfig(num_experts=4, top_k=2, expert_hidden=32,
                                                                       router="expert_choice", capacity_factor=1.0)},
                               vocab_size=50)
    with pytest.raises(ValueError, match="non-causal"):
        generate(archs.build(cfg), torch.zeros(1, 3, dtype=torch.long), 5)


# ------------------------------------------------------------------------------ the MoE transformer

def moe_model(seed=0, **moe):
    torch.manual_seed(seed)
    base = dict(PRESETS["debug"])
    cfg = MoETransformerConfig(**{**base, "moe": MoEConfig(**{**base["moe"], **moe})}, vocab_size=50)
    return archs.build(cfg), cfg


def test_moe_layers_placement():
    cfg = load_config("moe_debug", ["model.n_layers=4", "model.moe_every=2"]).model
    assert cfg.moe_layer_ids == [1, 3]
    assert load_config("moe_debug", ["model.n_layers=4", "model.moe_layers=[0, 2]"]).model.moe_layer_ids == [0, 2]
    assert cfg.moe.capacity_factor == 1.25 and cfg.moe.expert_hidden == 32  # preset + file merged
    model = archs.build(MoETransformerConfig(**{**PRESETS["debug"], "moe": MoEConfig(), "n_layers": 4},
                                             vocab_size=50, moe_every=2))
    assert [type(model.layers[str(i)].mlp).__name__ for i in range(4)] == ["SwiGLU", "MoELayer", "SwiGLU", "MoELayer"]


ROUTER_OPTIONS = {  # every router option, each with capacity on (training would drop)
    "topk_softmax_score_drop": dict(capacity_factor=0.5, drop_policy="score"),
    "topk_softmax_position_drop": dict(capacity_factor=0.5, drop_policy="position"),
    "top1_softmax_no_renorm": dict(top_k=1, renormalize=False, capacity_factor=0.5),
    "topk_sigmoid_jitter": dict(score_func="sigmoid", jitter=0.1, capacity_factor=0.5),
    "group_limited": dict(num_experts=8, num_groups=4, group_topk=2, capacity_factor=0.5),
    "bias_balancing": dict(bias_update_rate=0.1, capacity_factor=0.5),
    "shared_expert": dict(shared_expert_hidden=16, capacity_factor=0.5),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.0),
    "expert_choice_tight": dict(router="expert_choice", capacity_factor=0.25, min_capacity=1),
}


@pytest.mark.parametrize("option", list(ROUTER_OPTIONS))
def test_evaluation_logits_are_causal_for_every_router(option):
    """Changing a later token never changes an earlier position's evaluation logits (each row's
    change at position 25 of 40, in a batch of 2, so other sequences' tokens change too)."""
    model, _ = moe_model(**ROUTER_OPTIONS[option])
    if option == "bias_balancing":  # a non-zero selection bias, as after some training
        for layer in moe_layers(model):
            layer.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, layer.cfg.num_experts))
    model.eval()
    x = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(x)
        for t in (25, 39):
            y = x.clone()
            y[:, t] = (y[:, t] + 1) % 50
            torch.testing.assert_close(model(y)[:, :t], base[:, :t], rtol=0, atol=0)
            y = x.clone()
            y[1] = (y[1] + 7) % 50  # the other sequence of the batch changes entirely
            torch.testing.assert_close(model(y)[0], base[0], rtol=0, atol=0)


def test_expert_choice_training_routing_does_look_ahead():
    """The reason evaluation routes by token choice: in training, expert choice does see later tokens."""
    model, _ = moe_model(router="expert_choice", capacity_factor=0.25, min_capacity=1)
    model.train()
    x = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(x)
        y = x.clone()
        y[:, 20:] = (y[:, 20:] + 1) % 50
        assert (model(y)[:, :20] - base[:, :20]).abs().max() > 0


@pytest.mark.parametrize("policy, looks_ahead", [("score", True), ("position", False)])
def test_training_capacity_drops_look_ahead_only_by_score(policy, looks_ahead):
    """What the help of drop_policy says: in training, with capacity, `score` lets later tokens
    drop an earlier one; `position` never does. The later half of the second sequence changes;
    what comes before it in the micro-batch (all of sequence 0, the first half of sequence 1)
    must not, under `position`. (Under `position` a sequence still depends on the sequences
    before it in the micro-batch: causal within a sequence, not independent of the others.)"""
    model, _ = moe_model(capacity_factor=0.5, drop_policy=policy)
    model.train()
    x = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(x)
        changed = 0.0
        for shift in range(1, 6):
            y = x.clone()
            y[1, 20:] = (y[1, 20:] + shift) % 50
            out = model(y)
            changed = max(changed, (out[0] - base[0]).abs().max().item(), (out[1, :20] - base[1, :20]).abs().max().item())
    assert (changed > 0) == looks_ahead


def test_expert_choice_evaluation_is_token_choice_over_the_same_scores():
    layer = make_layer(router="expert_choice", capacity_factor=1.0).eval()
    x_NC = torch.randn(12, 16)
    with torch.no_grad():
        r = layer.router(x_NC)
        probs_NE = (x_NC @ layer.router.gate.weight.t()).softmax(-1)
        top = probs_NE.topk(2, dim=-1)
        assert torch.equal(r.expert_A, top.indices.reshape(-1))
        torch.testing.assert_close(r.weight_A, top.values.reshape(-1))
        assert torch.equal(r.token_A, torch.arange(12).repeat_interleave(2))


def batches(steps, seed=0):
    """Learnable sequences: arithmetic progressions mod 50."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        start, stride = rng.integers(0, 50, (8, 1)), rng.integers(1, 4, (8, 1))
        out.append(((start + stride * np.arange(17)) % 50).astype(np.int64))
    return out


def train(model, opt, sched, data):
    res = []
    for b in data:
        res.append(train_step(model, ArrayLM(), [b[:4], b[4:]], opt, DynamicLossScaler(False), "fp32", CPU, 1.0))
        sched.step()
    return res


def test_moe_transformer_trains_and_reports_aux_loss():
    model, _ = moe_model(capacity_factor=1.25, aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    opt = build_optimizer(model, 1e-2, 0.0, (0.9, 0.95))
    res = train(model, opt, build_scheduler(opt, 5, 60, 0.1), batches(60))
    assert np.mean([r.loss for r in res[-5:]]) < res[0].loss - 1.0
    assert all(r.aux_loss is not None and r.aux_loss > 0 for r in res)
    assert len(res[-1].moe["layers"]) == 2


def test_moe_transformer_resumes_exactly_with_balancing_bias(tmp_path):
    kw = dict(capacity_factor=1.0, bias_update_rate=1e-3)
    data = batches(7)
    model, cfg = moe_model(**kw)
    opt = build_optimizer(model, 1e-2, 0.0, (0.9, 0.95))
    straight = [r.loss for r in train(model, opt, build_scheduler(opt, 2, 8, 0.1), data)]
    model, cfg = moe_model(**kw)
    opt = build_optimizer(model, 1e-2, 0.0, (0.9, 0.95))
    sched = build_scheduler(opt, 2, 8, 0.1)
    first = [r.loss for r in train(model, opt, sched, data[:3])]
    assert moe_layers(model)[0].router.expert_bias.abs().sum() > 0  # 3 sign updates: never all back at 0
    checkpoint.save(tmp_path / "c", model, opt, {"step": 3, "scheduler": sched.state_dict(), "scaler": {}}, cfg, 0, 1)
    model2, _ = moe_model(seed=7, **kw)
    opt2 = build_optimizer(model2, 1e-2, 0.0, (0.9, 0.95))
    sched2 = build_scheduler(opt2, 2, 8, 0.1)
    sched2.load_state_dict(checkpoint.load(tmp_path / "c", model2, opt2, cfg, 0, 1)["scheduler"])
    torch.testing.assert_close(moe_layers(model2)[0].router.expert_bias, moe_layers(model)[0].router.expert_bias)
    rest = [r.loss for r in train(model2, opt2, sched2, data[3:])]
    np.testing.assert_allclose(first + rest, straight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_fused_swiglu_gradcheck(weighted):
    from moe.experts import swiglu
    h = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True) if weighted else None
    assert torch.autograd.gradcheck(lambda h, *w: swiglu(h, *w), (h, *([w] if weighted else [])))
    ref = F.silu(h[:, :4]) * h[:, 4:] * (w[:, None] if weighted else 1)
    torch.testing.assert_close(swiglu(h, w), ref)


@pytest.mark.parametrize("hidden", [8, 32])  # routing weight on the hidden (F <= C) or on the output
def test_weight_placement_gives_the_same_layer(hidden):
    layer = make_layer(expert_hidden=hidden).train()
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(layer(x).view(-1, 16), per_token_reference(layer, x.view(-1, 16)), atol=1e-5, rtol=1e-5)


def test_jitter_perturbs_routing_in_training_only():
    layer = make_layer(jitter=0.5)
    x = torch.randn(64, 16)
    torch.manual_seed(1)
    train_routes = [layer.train().router(x).expert_A for _ in range(2)]
    assert not torch.equal(train_routes[0], train_routes[1])
    eval_routes = [layer.eval().router(x).expert_A for _ in range(2)]
    assert torch.equal(eval_routes[0], eval_routes[1])


def test_flops_per_token_counts_active_experts_only():
    model, cfg = moe_model()
    all_params = sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.d_model * cfg.moe.expert_hidden
    without = model.flops_per_token(64)
    for layer in moe_layers(model):  # as if EP kept 2 of the 4 experts: the active FLOPs do not change
        layer.experts.w13 = torch.nn.Parameter(layer.experts.w13[:2])
        layer.experts.w2 = torch.nn.Parameter(layer.experts.w2[:2])
        layer.experts.num_experts = 2
    assert model.flops_per_token(64) == without
    assert without < 6 * all_params + 12 * cfg.n_layers * cfg.d_model * 64  # not every expert is active
    assert without > 6 * cfg.moe.top_k * per_expert * len(cfg.moe_layer_ids)
