"""Mixed precision through the MoE path: what dtype each kernel sees under autocast, parity with
fp32 (outputs, gradients, 20 training steps), fp16 overflow skipping, and the backend checks."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import archs
import kernels
from archs.moe_transformer import PRESETS, MoETransformerConfig
from cluster.tasks.lm import LanguageModeling
from cluster.train.precision import DTYPES, DynamicLossScaler, GemmDtypeRecorder, autocast
from cluster.train.step import train_step
from kernels import blocksparse
from moe.config import MoEConfig
from moe.experts import GroupedExperts
from moe.layer import MoELayer
from moe.losses import router_losses

CPU = torch.device("cpu")
CPU_BACKENDS = ["loop", "padded", "grouped", "blocksparse"]
LOW = ["bf16", "fp16"]
# Relative (Frobenius) error bound against the fp32 layer: a few ulps of the dtype's 8/11-bit
# mantissa, accumulated over three GEMMs.
REL_TOL = {"bf16": 3e-2, "fp16": 5e-3}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blocksparse, "BLOCK_SIZE", 8)


def need(backend: str, dtype: torch.dtype) -> None:
    if backend not in kernels.available_backends("cpu", dtype):
        pytest.skip(f"{backend} unavailable on cpu/{dtype}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def make_layer(backend: str, seed: int = 0, **moe) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=24, capacity_factor=None, backend=backend,
                    aux_loss_coeff=1e-2, z_loss_coeff=1e-3, **moe)
    layer = MoELayer(16, cfg)
    layer.init_weights(0.2, 0.2)
    return layer.train()


@pytest.mark.parametrize("precision", LOW)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_expert_kernels_receive_the_autocast_dtype(backend, precision):
    """Forward and backward: every GEMM inside the experts gets autocast's dtype (fp32 rows and
    fp32 master weights go in); the master weights' gradients come back in fp32."""
    dtype = DTYPES[precision]
    need(backend, dtype)
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 24, backend)
    experts.init_weights(0.2, 0.2)
    sizes = torch.tensor([5, 0, 7, 4])  # an empty expert too
    x = torch.randn(16, 16, requires_grad=True)
    weight = torch.rand(16)
    rec = GemmDtypeRecorder()
    with rec:
        with autocast(precision, CPU):
            y = experts(x, sizes, weight)
        y.float().square().sum().backward()
    assert rec.seen, "no GEMM was recorded"
    assert rec.dtypes() == {dtype}, rec.seen
    assert y.dtype == dtype
    assert experts.w13.dtype == experts.w13.grad.dtype == torch.float32
    assert experts.w2.grad.dtype == x.grad.dtype == torch.float32
    assert not experts.w13.grad[1].any() and not experts.w2.grad[1].any()  # the empty expert


@pytest.mark.parametrize("precision", LOW)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_moe_layer_under_autocast_equals_fp32(backend, precision):
    """The layer under autocast: router logits and losses in fp32, output combined in fp32, and
    output and every parameter gradient within the dtype's tolerance of the fp32 layer."""
    dtype = DTYPES[precision]
    need(backend, dtype)
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(1))
    results = {}
    for p in ("fp32", precision):
        layer = make_layer(backend)
        xi = x.clone().requires_grad_()
        with autocast(p, CPU):
            routing = layer.router(xi.view(-1, 16))
            losses = router_losses(routing, layer.cfg, 12)
            out = layer(xi)
        assert routing.logits_NE.dtype == routing.weight_A.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in losses.values())
        assert out.dtype == torch.float32  # sum of experts' outputs accumulated in fp32
        out.square().mean().backward()
        results[p] = (out.detach(), xi.grad, {n: q.grad for n, q in layer.named_parameters()})
    out32, dx32, g32 = results["fp32"]
    out16, dx16, g16 = results[precision]
    tol = REL_TOL[precision]
    assert rel_err(out16, out32) < tol
    assert rel_err(dx16, dx32) < tol
    for name, g in g32.items():
        assert g16[name].dtype == torch.float32, name
        assert rel_err(g16[name], g) < tol, (name, rel_err(g16[name], g))


def test_combine_accumulates_in_fp32():
    """bf16 expert outputs summed per token: the fp32 accumulation equals the exact sum of the
    bf16 values; a bf16 accumulation would round after every addition."""
    from moe.dispatcher import sum_by_token

    y = (torch.randn(64, 8) * 100).to(torch.bfloat16)
    token = torch.arange(8).repeat_interleave(8)
    out = sum_by_token(y, token, 8, torch.float32)
    exact = y.double().view(8, 8, 8).sum(1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-4)
    assert sum_by_token(y, token, 8, torch.bfloat16).dtype == torch.bfloat16


class ArrayLM(LanguageModeling):
    """Language modelling on in-memory token arrays (the loss code is the real one)."""

    def __init__(self):
        pass


def tiny_moe_model(backend: str):
    torch.manual_seed(0)
    preset = dict(PRESETS["debug"])
    moe = MoEConfig(**{**preset.pop("moe"), "expert_hidden": 24, "backend": backend, "capacity_factor": None})
    return archs.build(MoETransformerConfig(**preset, moe=moe, vocab_size=64))


def run_steps(precision: str, backend: str, steps: int = 20, scaler=None):
    model = tiny_moe_model(backend)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    scaler = scaler or DynamicLossScaler(enabled=precision == "fp16", init_scale=2.0 ** 10)
    layout = (model.cfg.moe_layer_ids, model.cfg.moe.num_experts)
    batch = rng.integers(0, 64, size=(4, 33), dtype=np.int64)  # one fixed batch: the loss falls
    results = [train_step(model, ArrayLM(), [batch[:2], batch[2:]], opt, scaler, precision, CPU, 1.0, layout)
               for _ in range(steps)]
    return results, model, scaler


@pytest.mark.parametrize("precision", LOW)
def test_twenty_moe_steps_track_fp32(precision):
    backend = "grouped" if "grouped" in kernels.available_backends("cpu", DTYPES[precision]) else "loop"
    ref, _, _ = run_steps("fp32", backend)
    low, model, _ = run_steps(precision, backend)
    ref_loss = np.array([r.loss for r in ref])
    low_loss = np.array([r.loss for r in low])
    assert not any(r.skipped for r in low)
    assert ref_loss[-1] < 0.8 * ref_loss[0]  # it learns, so tracking means something
    np.testing.assert_allclose(low_loss, ref_loss, rtol=0.03)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_overflow_in_the_experts_is_skipped_by_the_scaler():
    """A loss scale so large that the fp16 expert GEMMs' backward overflows: the step is skipped
    (weights unchanged), the scale backs off, and the next step at a sane scale trains."""
    backend = "grouped" if "grouped" in kernels.available_backends("cpu", torch.float16) else "loop"
    model = tiny_moe_model(backend)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = DynamicLossScaler(enabled=True, init_scale=1e30)
    batch = np.random.default_rng(0).integers(0, 64, size=(2, 33), dtype=np.int64)
    layout = (model.cfg.moe_layer_ids, model.cfg.moe.num_experts)
    r = train_step(model, ArrayLM(), [batch], opt, scaler, "fp16", CPU, 1.0, layout)
    assert r.skipped and scaler.scale == 0.5e30
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    scaler.scale = 2.0 ** 8
    r = train_step(model, ArrayLM(), [batch], opt, scaler, "fp16", CPU, 1.0, layout)
    assert not r.skipped and not all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --- which backend runs, said once per run; an impossible request fails on the driver ------------

def test_kernel_report_names_the_backend_and_every_skipped_one():
    from cluster.train.precision import kernel_report

    model = tiny_moe_model("auto")
    lines, record = kernel_report(model, "bf16", CPU)
    expected = "grouped" if "grouped" in kernels.available_backends("cpu", torch.bfloat16) else "loop"
    assert len(lines) == 1 and f"MoE kernel backend {expected} on cpu/bfloat16 (asked: auto)" in lines[0]
    assert "megablocks: needs a CUDA device" in lines[0] and "GPU install" in lines[0]
    assert record["moe_backend"] == expected and record["kernel_dtype"] == "bfloat16" and not record["slow_path"]
    assert set(record["skipped"]) == {"padded", "blocksparse", "megablocks"}


def test_auto_landing_on_the_loop_on_cuda_warns():
    """Asked about CUDA on this GPU-less machine, auto really resolves to the loop (grouped_gemm
    absent, torch's grouped GEMM trial fails): the report warns and the record says so."""
    from cluster.train.precision import kernel_report

    lines, record = kernel_report(tiny_moe_model("auto"), "bf16", torch.device("cuda"))
    assert "MoE kernel backend loop on cuda/bfloat16" in lines[0]
    assert "megablocks:" in lines[0] and "grouped:" in lines[0]
    assert lines[-1].startswith("[raymoe] WARNING: MoE backend auto fell back to the per-expert loop on cuda")
    assert record["slow_path"] and record["moe_backend"] == "loop"
    assert kernel_report(archs.build(dataclasses.replace(tiny_moe_model("auto").cfg, moe_layers=[])), "bf16",
                         CPU) == ([], {})


@pytest.mark.parametrize("overrides,match", [
    (["model.moe.backend=megablocks"], "needs a CUDA device.*GPU install"),
    (["model.moe.backend=megablocks", "cluster.use_gpu=true", "train.precision=fp32"], "supports.*bfloat16"),
    (["model.moe.backend=megablocks", "cluster.use_gpu=true", "train.precision=bf16"], "not installed.*GPU install"),
    (["model.moe.backend=grouped", "model.moe.expert_hidden=31", "train.precision=bf16"], "multiples of 8"),
])
def test_unavailable_backend_is_a_config_error_on_the_driver(overrides, match):
    from cluster.config.job import ConfigError, load_config
    from kernels import megablocks

    if "cluster.use_gpu=true" in overrides and (torch.cuda.is_available() or megablocks.installed()):
        pytest.skip("this machine has a GPU or grouped_gemm")
    if "model.moe.backend=grouped" in overrides and "grouped" not in kernels.available_backends("cpu", torch.bfloat16):
        pytest.skip("grouped unavailable")
    with pytest.raises(ConfigError, match=f"model.moe.backend: .*{match}"):
        load_config("moe_debug", overrides)
    load_config("moe_debug", [o for o in overrides if "backend" not in o] + ["model.moe.backend=auto"])


def test_auto_on_widths_grouped_cannot_take_runs_under_autocast():
    """expert_hidden 31 under bf16 autocast (the reported crash: 'x and w dtypes differ'): auto
    takes the loop for both GEMMs, in bf16, and matches the fp32 layer."""
    x = torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(2))
    outs = {}
    for p in ("fp32", "bf16"):
        torch.manual_seed(0)
        layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, expert_hidden=31, capacity_factor=None)).train()
        layer.init_weights(0.2, 0.2)
        with autocast(p, CPU):
            outs[p] = layer(x)
    assert layer.experts.choice(CPU, torch.bfloat16).backend == "loop"
    assert rel_err(outs["bf16"], outs["fp32"]) < REL_TOL["bf16"]
