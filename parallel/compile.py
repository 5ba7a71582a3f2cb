"""Regional compilation (`train.compile`): each block of `model.layers` compiled in place.

One compiled region per block, as torchtitan does: the blocks share code, so dynamo compiles the
block once and reuses it (guards permitting) instead of tracing the whole model. `nn.Module.compile`
compiles in place, so parameter names and `state_dict` keys stay what they were. An MoE layer stays
eager: its row counts per expert are data-dependent (they size the GEMMs and, under expert
parallelism, the exchange buffers after a host sync), which would recompile or break the graph
every step; the rest of its block (norms, attention) is compiled, and so is the SwiGLU between
its experts' two grouped GEMMs (`GroupedExperts.compile_activation`: elementwise only, with
dynamic row counts, so one graph serves every routing).
"""
from __future__ import annotations

import torch.nn as nn

from moe.layer import moe_layers


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile every block of `model.layers` (inside its activation-checkpoint wrapper, if any).
    `backend`: torch.compile's (tests use "aot_eager": the same graph capture and autograd split
    without inductor's C++ code generation, which takes minutes on a loaded 2-core machine)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        raise ValueError(f"train.compile: {type(model).__name__} has no `layers` ModuleDict of blocks to compile; "
                         "set train.compile: false for this architecture")
    for block in layers.values():
        block = getattr(block, "_checkpoint_wrapped_module", block)  # compile what the checkpoint recomputes
        if not moe_layers(block):
            block.compile(backend=backend)
            continue
        for child in block.children():
            if not moe_layers(child):
                child.compile(backend=backend)
        for layer in moe_layers(block):
            layer.experts.compile_activation(backend)
    return model
