"""Layouts pp x dp x tp (ep inside dp): validation, and the harness that runs a layout on spawned gloo
process groups against the single-process run (used by test_tensor_parallel / test_pipeline_parallel).

The reference trains the plain model with `train_step` on the step's micro-batches of every
data-parallel rank in turn (what the layout computes: the same global batch, the same per-micro-
batch routing and capacity), with plain SGD so that weights after several steps compare gradients.
Each rank also records its first step's gradients (TP shards gathered to full tensors).
"""
import numpy as np
import pytest
import torch

import archs
import parallel
from archs.moe_transformer import PRESETS as MOE_PRESETS
from archs.moe_transformer import MoETransformerConfig
from archs.transformer import PRESETS, TransformerConfig
from cluster.train.precision import DynamicLossScaler
from cluster.config.job import ConfigError, load_config, num_experts
from cluster.train.step import train_step
from moe.config import MoEConfig
from moe.layer import moe_layers
from parallel.mesh import ParallelDims, build_groups, valid_layouts
from parallel.pipeline import stage_layers
from tests.test_expert_parallel import spawn
from tests.test_step import CPU, ArrayLM

STEPS = 6
ROWS = 2  # sequences per micro-batch
LR = 0.2


def dense_cfg(**kw):
    return TransformerConfig(**{**PRESETS["debug"], **kw}, vocab_size=50)


def moe_cfg(moe=None, **kw):
    base = dict(MOE_PRESETS["debug"])
    m = MoEConfig(**{**base.pop("moe"), "backend": "loop", **(moe or {})})
    return MoETransformerConfig(**{**base, **kw}, moe=m, vocab_size=50)


def step_data(dp: int, micro: int, steps: int = STEPS, seed: int = 3) -> list[list[list[np.ndarray]]]:
    """data[step][dp_rank] = that rank's micro-batches (ROWS x 17 tokens each): learnable progressions."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        per_rank = []
        for _ in range(dp):
            mbs = []
            for _ in range(micro):
                start, stride = rng.integers(0, 50, (ROWS, 1)), rng.integers(1, 4, (ROWS, 1))
                mbs.append(((start + stride * np.arange(17)) % 50).astype(np.int64))
            per_rank.append(mbs)
        out.append(per_rank)
    return out


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a full copy of every gradient of its first step, by parameter name."""

    def __init__(self, model):
        super().__init__(model.parameters(), lr=LR)
        # the activation-checkpointing wrapper's prefix is not part of the keys (state_dict strips it too)
        self.names = {id(p): n.replace("_checkpoint_wrapped_module.", "") for n, p in model.named_parameters()}
        self.first_grads: dict | None = None

    def step(self, closure=None):
        if self.first_grads is None:
            self.first_grads = {self.names[id(p)]: full(p.grad).clone() for g in self.param_groups
                                for p in g["params"] if p.grad is not None}
        return super().step(closure)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def _is_shard(p: torch.Tensor) -> bool:
    """Whether this rank holds only part of `p` along a data-parallel (FSDP) mesh dimension."""
    from torch.distributed.tensor import DTensor
    return isinstance(p, DTensor) and p._local_tensor.numel() < p.numel() and any(
        n.startswith("dp") or n == "edp" for n in p.device_mesh.mesh_dim_names or ())


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return archs.build(cfg)


def reference(cfg, data, steps=STEPS, split: int | None = None, scaler=False):
    """The single process on every rank's micro-batches in turn; `split` re-cuts each rank's
    sequences into that many micro-batches first (what a pipeline with `parallel.microbatches`
    feeds its layers: MoE capacity and auxiliary losses are per layer call); `scaler`: fp16's
    loss scaling (any precision: it multiplies and divides back)."""
    model = build(cfg)
    opt = RecordingSGD(model)
    scaler = DynamicLossScaler(scaler)

    def micro(rank_mbs):
        return rank_mbs if split is None else np.array_split(np.concatenate(rank_mbs), split)

    results = [train_step(model, ArrayLM(), [mb for rank in data[s] for mb in micro(rank)], opt,
                          scaler, "fp32", CPU, 1.0, _moe_layout(cfg)) for s in range(steps)]
    return model, opt, results


def _moe_counts(result) -> list[list[float]]:
    """Per MoE layer: tokens per expert (before dropping) and copies dropped, of one step."""
    if not result.moe:
        return []
    return [[*layer["tokens_per_expert"], layer["dropped_frac"]] for layer in result.moe["layers"]]


def _moe_layout(cfg):
    moe = getattr(cfg, "moe", None)
    return (cfg.moe_layer_ids, moe.num_experts) if moe is not None else None


def _layout_worker(rank, world, layout, cfg, data, out):
    dims = ParallelDims.build(world, layout.get("ep", 1), num_experts(cfg), tp=layout.get("tp", 1),
                              pp=layout.get("pp", 1), model_cfg=cfg)
    groups = build_groups(dims, rank)
    par = parallel.apply(build(cfg), groups, CPU, schedule=layout.get("schedule", "1f1b"),
                         microbatches=layout.get("microbatches"), pp_split=layout.get("pp_split"),
                         fsdp=layout.get("fsdp", False),
                         activation_checkpointing=layout.get("activation_checkpointing", layout.get("ac", False)),
                         reshard_after_forward=layout.get("reshard_after_forward", True))
    opt = RecordingSGD(par.model)
    dp_rank = dims.coords(rank)[1]
    scaler = DynamicLossScaler(layout.get("loss_scaler", False))
    res = [train_step(par, ArrayLM(), data[s][dp_rank], opt, scaler, "fp32", CPU, 1.0,
                      _moe_layout(cfg)) for s in range(len(data))]
    layers = moe_layers(par.model)
    torch.save({"losses": [r.loss for r in res], "aux": [r.aux_loss for r in res],
                "grad_norms": [r.grad_norm for r in res], "grads": opt.first_grads,
                "moe": [_moe_counts(r) for r in res],
                "state": {k: full(v) for k, v in par.model.state_dict().items()},
                "sharded": {n.replace("_checkpoint_wrapped_module.", ""): _is_shard(p)
                            for n, p in par.model.named_parameters()},
                "expert_offset": layers[0].experts.expert_offset if layers and hasattr(layers[0].experts, "expert_offset")
                else 0}, f"{out}/rank{rank}.pt")


def check_layout(tmp_path, world: int, cfg, layout: dict, micro: int = 2, grad_keys: tuple = ()):
    """Run `layout` on `world` gloo ranks and compare with the single process: losses, gradient
    norms, auxiliary losses and MoE statistics (tokens per expert, dropped share) per step,
    first-step gradients, final weights. Returns the reference (model, optimizer) and every
    rank's saved results."""
    dims = ParallelDims.build(world, layout.get("ep", 1), num_experts(cfg), tp=layout.get("tp", 1),
                              pp=layout.get("pp", 1), model_cfg=cfg)
    data = step_data(dims.dp, micro)
    ref_model, ref_opt, ref = reference(cfg, data, split=layout.get("microbatches"),
                                        scaler=layout.get("loss_scaler", False))
    spawn(_layout_worker, world, layout, cfg, data, str(tmp_path))
    ref_state = ref_model.state_dict()
    n_local = cfg.moe.num_experts // dims.ep if getattr(cfg, "moe", None) else 0
    got_all = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    held = set()
    for rank, got in enumerate(got_all):
        np.testing.assert_allclose(got["losses"], [r.loss for r in ref], rtol=0, atol=1e-5, err_msg=f"rank {rank}")
        np.testing.assert_allclose(got["grad_norms"], [r.grad_norm for r in ref], rtol=1e-4, atol=1e-6)
        if ref[0].aux_loss is not None:
            np.testing.assert_allclose(got["aux"], [r.aux_loss for r in ref], rtol=0, atol=1e-6)
            np.testing.assert_allclose(got["moe"], [_moe_counts(r) for r in ref], rtol=0, atol=1e-9,
                                       err_msg=f"rank {rank}: MoE statistics (tokens per expert, dropped share)")

        def want(key, table):
            value = table[key]
            if ".experts." in key and dims.ep > 1:  # this rank's slice of the experts
                value = value[got["expert_offset"]:got["expert_offset"] + n_local]
            return value

        for key, grad in got["grads"].items():
            torch.testing.assert_close(grad, want(key, ref_opt.first_grads), atol=1e-6, rtol=1e-4,
                                       msg=f"rank {rank}: first-step gradient of {key}")
        for key, value in got["state"].items():
            torch.testing.assert_close(value, want(key, ref_state), atol=1e-5, rtol=1e-4, msg=f"rank {rank}: {key}")
        held |= set(got["grads"])
    for key in grad_keys:  # the gradients the test is about were really compared somewhere
        assert key in held, f"no rank holds {key}"
    return ref_model, ref_opt, got_all


# ---------------------------------------------------------------- layouts, checked before training

def test_valid_layouts_of_four_ranks_for_the_debug_model():
    assert valid_layouts(4, dense_cfg()) == [(1, 4, 1), (1, 2, 2), (1, 1, 4), (2, 2, 1), (2, 1, 2)]  # not pp=4 (2 layers)
    assert valid_layouts(4, dense_cfg(n_heads=2)) == [(1, 4, 1), (1, 2, 2), (2, 2, 1), (2, 1, 2)]  # tp=4 > 2 heads


@pytest.mark.parametrize("sets, message", [
    (["parallel.tp=2", "parallel.pp=2"], r"parallel: pp=2 x dp=\? x tp=2 does not make the world size 2; "
                                         r"valid layouts for 2 worker\(s\): pp=1 x dp=2 x tp=1, pp=1 x dp=1 x tp=2, "
                                         r"pp=2 x dp=1 x tp=1"),
    (["parallel.tp=2", "parallel.dp=2"], r"parallel.dp: 2 != cluster.num_workers=2 / \(parallel.tp=2 x parallel.pp=1\)"),
    (["parallel.tp=2", "model.n_heads=2", "model.n_kv_heads=1"], r"parallel.tp: 2 does not divide model.n_kv_heads=1"),
    (["parallel.tp=2", "model.d_ff=63"], r"parallel.tp: 2 does not divide model.d_ff \(MLP hidden width\)=63"),
    (["parallel.pp=2", "model.n_layers=1"], r"parallel.pp: 2 stages need at least 2 layers"),
    (["parallel.pp=2", "parallel.pp_split=[0]"], r"parallel.pp_split: \[0\] must list 1 increasing layer ids"),
    (["parallel.pp=2", "parallel.schedule=zero"], r"parallel.schedule: 'zero' is not one of"),
    (["parallel.pp=2", "parallel.microbatches=3"], r"parallel.microbatches: 3 does not divide"),
    (["parallel.tp=2", "model.arch=mamba", "model.preset=debug"], r"tensor and pipeline parallelism support"),
])
def test_invalid_layouts_are_rejected_before_training(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("debug", sets)


def test_layouts_are_checked_at_every_elastic_size():
    with pytest.raises(ConfigError, match=r"does not make the world size 1;.*\(at 1 workers of the elastic range 1..2\)"):
        load_config("debug", ["parallel.tp=2", "cluster.min_workers=1", "train.global_batch_size=4"])


def test_config_layout_reaches_the_dims():
    cfg = load_config("moe_debug", ["cluster.num_workers=4", "train.global_batch_size=8", "parallel.pp=2",
                                    "parallel.ep=auto", "parallel.schedule=gpipe"])
    dims = cfg.parallel_dims()
    assert (dims.pp, dims.dp, dims.tp, dims.ep) == (2, 2, 1, 2)
    assert dims.coords(3) == (1, 1, 0) and dims.ep_group_ranks(3) == [2, 3] and dims.pp_group_ranks(3) == [1, 3]
    assert cfg.accumulation_steps == 2  # 8 sequences over dp=2 ranks in micro-batches of 2


def test_ranks_of_a_pp2_dp2_tp2_mesh():
    dims = ParallelDims.build(8, 2, 4, tp=2, pp=2)
    assert dims.coords(5) == (1, 0, 1)
    assert dims.tp_group_ranks(5) == [4, 5] and dims.dp_group_ranks(5) == [5, 7] and dims.pp_group_ranks(5) == [1, 5]
    assert dims.ep_group_ranks(5) == [5, 7] and dims.edp_group_ranks(5) == [4, 5]  # experts: edp 1 x tp 2


def test_stage_cut_even_or_explicit():
    assert stage_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert stage_layers(4, 4) == [[0], [1], [2], [3]]
    assert stage_layers(4, 2, [3]) == [[0, 1, 2], [3]]


# ------------------------------------------------------------------------------- composites (4 ranks)

@pytest.mark.multiproc
def test_pp2_x_dp2_x_ep2_moe_equals_single_process(tmp_path):
    cfg = moe_cfg(moe_layers=[1, 2], n_layers=3, moe={"capacity_factor": 1.0, "min_capacity": 1})
    check_layout(tmp_path, 4, cfg, {"pp": 2, "ep": 2, "schedule": "1f1b"},
                 grad_keys=("layers.1.mlp.router.gate.weight", "layers.2.mlp.experts.w13", "embed.weight"))


@pytest.mark.multiproc
def test_tp2_x_dp2_x_ep2_moe_with_shared_expert_equals_single_process(tmp_path):
    cfg = moe_cfg(moe={"shared_expert_hidden": 16, "capacity_factor": 1.0, "min_capacity": 1})
    check_layout(tmp_path, 4, cfg, {"tp": 2, "ep": 2},
                 grad_keys=("layers.1.mlp.router.gate.weight", "layers.1.mlp.shared.w1.weight",
                            "layers.0.attn.wq.weight"))


@pytest.mark.multiproc
def test_dp2_through_parallel_apply_equals_single_process(tmp_path):
    check_layout(tmp_path, 2, dense_cfg(), {}, grad_keys=("layers.0.attn.wq.weight", "embed.weight"))


# ------------------------------------------------------------ checkpoints across layouts (DCP resharding)

def _ckpt_worker(rank, world, layout, cfg, data, out):
    from cluster import checkpoint
    from cluster.train.optim import build_optimizer

    dims = ParallelDims.build(world, 1, num_experts(cfg), tp=layout.get("tp", 1), pp=layout.get("pp", 1), model_cfg=cfg)
    par = parallel.apply(build(cfg), build_groups(dims, rank), CPU, schedule=layout.get("schedule", "1f1b"))
    opt = par.prepare_optimizer(build_optimizer(par.model, 1e-2, 0.1, (0.9, 0.95)))
    dp_rank = dims.coords(rank)[1]
    for s in range(3):
        train_step(par, ArrayLM(), data[s][dp_rank], opt, DynamicLossScaler(False), "fp32", CPU, 1.0, _moe_layout(cfg))
    checkpoint.save(out, par.model, opt, {"step": 3}, cfg, rank, world)


def check_checkpoint_to_single_process(tmp_path, cfg, layout: dict, world: int = 2):
    """`layout` trains 3 steps (AdamW) and saves; one process loads it into the whole model (another
    init) and trains 3 more: the losses equal a straight single-process run of 6 steps."""
    from cluster import checkpoint
    from cluster.train.optim import build_optimizer

    data = step_data(1, 2)

    def run(model, opt, steps):
        return [train_step(model, ArrayLM(), data[s][0], opt, DynamicLossScaler(False), "fp32", CPU, 1.0,
                           _moe_layout(cfg)).loss for s in steps]

    model = build(cfg)
    straight = run(model, build_optimizer(model, 1e-2, 0.1, (0.9, 0.95)), range(6))
    spawn(_ckpt_worker, world, layout, cfg, data, str(tmp_path / "ckpt"))
    assert checkpoint.verify(tmp_path / "ckpt")["world_size"] == world
    model = build(cfg, seed=99)
    opt = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
    checkpoint.load(tmp_path / "ckpt", model, opt, cfg, 0, 1)
    np.testing.assert_allclose(run(model, opt, range(3, 6)), straight[3:], rtol=0, atol=1e-4)
