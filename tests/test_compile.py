"""`train.compile` (parallel.compile.apply_compile): compiled blocks train like eager ones.

Compiled with the "aot_eager" backend: dynamo's capture, the graph breaks and AOT autograd's
forward/backward split are what regional compilation adds; inductor's C++ code generation takes
minutes on this shared 2-core machine (the job uses inductor)."""
import numpy as np
import torch

import archs
from archs.moe_transformer import PRESETS as MOE_PRESETS, MoETransformerConfig
from moe.config import MoEConfig
from moe.experts import swiglu, swiglu_ops
from moe.layer import moe_layers
from parallel.compile import apply_compile
from parallel.data_parallel import apply_activation_checkpointing
from tests.test_step import global_batches, make_model, run_steps


def _moe_model():
    base = dict(MOE_PRESETS["debug"])
    torch.manual_seed(0)
    return archs.build(MoETransformerConfig(**{**base, "moe": MoEConfig(**{**base["moe"], "backend": "loop"})},
                                            vocab_size=50))


def test_compiled_blocks_keep_state_dict_keys_and_train_like_eager():
    torch._dynamo.reset()
    data = global_batches(10, rows=4)
    eager, compiled = make_model(), apply_compile(make_model(), backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert all(b._compiled_call_impl is not None for b in compiled.layers.values())
    np.testing.assert_allclose(run_steps(compiled, data, micro=2), run_steps(eager, data, micro=2), rtol=0, atol=1e-4)


def test_moe_layers_stay_eager_inside_compiled_checkpointed_blocks():
    torch._dynamo.reset()
    data = global_batches(10, rows=4)
    eager = _moe_model()
    compiled = apply_compile(apply_activation_checkpointing(_moe_model()), backend="aot_eager")
    for layer in moe_layers(compiled):
        assert layer._compiled_call_impl is None
    block = compiled.layers["0"]._checkpoint_wrapped_module
    assert block.attn._compiled_call_impl is not None
    np.testing.assert_allclose(run_steps(compiled, data, micro=2), run_steps(eager, data, micro=2), rtol=0, atol=1e-4)


def test_moe_layers_compile_only_their_swiglu_and_train_like_eager():
    """Under train.compile an MoE layer stays eager but its experts' SwiGLU is compiled."""
    torch._dynamo.reset()
    compiled = apply_compile(_moe_model(), backend="aot_eager")
    for layer in moe_layers(compiled):
        assert layer.experts.activation is not swiglu
    data = global_batches(10, rows=4)
    np.testing.assert_allclose(run_steps(compiled, data, micro=2), run_steps(_moe_model(), data, micro=2),
                               rtol=0, atol=1e-4)


def test_the_inductor_compiled_swiglu_equals_the_eager_one_for_any_row_count():
    """What the job compiles (inductor, dynamic row counts), at tiny shapes: output and both input
    gradients against the eager autograd function, for row counts that differ between calls."""
    torch._dynamo.reset()
    fused = torch.compile(swiglu_ops, backend="inductor", dynamic=True)
    gen = torch.Generator().manual_seed(0)
    for rows in (37, 64, 5):
        for weighted in (True, False):
            h = torch.randn(rows, 2 * 24, generator=gen)
            w = torch.rand(rows, generator=gen) if weighted else None
            grad = torch.randn(rows, 24, generator=gen)
            got = _value_and_grads(fused, h, w, grad)
            want = _value_and_grads(swiglu, h, w, grad)
            for g, e in zip(got, want):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def _value_and_grads(fn, h, w, grad):
    h = h.clone().requires_grad_(True)
    w = None if w is None else w.clone().requires_grad_(True)
    out = fn(h, w)
    out.backward(grad)
    return [out.detach(), h.grad] + ([] if w is None else [w.grad])
