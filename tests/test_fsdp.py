"""FSDP2 (parallel.fsdp) against the single process, alone and composed with EP, TP and PP.

Every layout runs on spawned gloo ranks through `parallel.apply` and `train_step` (the code the
Ray loop runs) and is compared by `check_layout` with the plain model trained on the same global
batch: per-step losses (1e-5), gradient norms (the clipped, sharded norm), MoE auxiliary losses,
every first-step gradient gathered to its full tensor (1e-6) and every weight after the plain-SGD
steps. Two micro-batches per step: gradients accumulate unreduced until the last one.
"""
import numpy as np
import pytest
import torch

import parallel
from cluster.config.job import ConfigError, load_config, num_experts
from cluster.train.precision import DynamicLossScaler
from cluster.train.step import train_step
from parallel.mesh import ParallelDims, build_groups
from tests import ranks
from tests.test_expert_parallel import spawn
from tests.test_parallel_layouts import _moe_layout, build, check_layout, dense_cfg, moe_cfg, step_data
from tests.test_step import CPU, ArrayLM

MOE = {"capacity_factor": 1.0, "min_capacity": 1}


# ------------------------------------------------------------------- refused on the driver, with the fix

@pytest.mark.parametrize("sets, message", [
    (["parallel.fsdp=3", "cluster.num_workers=4", "train.global_batch_size=8"],
     r"parallel.fsdp: a degree of 3 does not divide the data-parallel size 4 into shard groups; "
     r"valid: true, false, or a degree 2, 4"),
    (["parallel.fsdp=2", "cluster.num_workers=2", "cluster.min_workers=1"],
     r"a degree of 2 does not divide the data-parallel size 1.*\(at 1 workers of the elastic range 1..2\)"),
    (["parallel.fsdp=true", "model.arch=mamba", "model.preset=debug"], r"parallel.fsdp: supports model.arch"),
    (["parallel.fsdp=true", "parallel.pp=2", "parallel.schedule=interleaved_1f1b", "cluster.num_workers=4", "model.n_layers=4",
      "train.global_batch_size=8"], r"not with parallel.schedule=interleaved_1f1b"),
    (["parallel.fsdp=2", "parallel.ep=2", "cluster.num_workers=4", "train.global_batch_size=8"],
     r"the HSDP degree 2 \(< dp=4\) is supported for data parallelism alone"),
])
def test_invalid_fsdp_layouts_are_rejected_before_training(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("moe_debug", sets)


def test_fsdp_config_reaches_the_job():
    cfg = load_config("moe_debug", ["parallel.fsdp=true", "parallel.ep=2", "parallel.fsdp_reshard_after_forward=false"])
    assert cfg.parallel.fsdp is True and cfg.parallel.fsdp_reshard_after_forward is False
    assert load_config("moe_debug", ["parallel.fsdp=2", "cluster.num_workers=4",
                                     "train.global_batch_size=8"]).parallel.fsdp == 2


@pytest.mark.multiproc
def test_fsdp_dp2_dense_equals_single_process(tmp_path):
    _, _, got = check_layout(tmp_path, 2, dense_cfg(), {"fsdp": True},
                             grad_keys=("layers.0.attn.wq.weight", "embed.weight"))
    assert all(got[r]["sharded"]["layers.0.attn.wq.weight"] for r in range(2))


@pytest.mark.multiproc
def test_fsdp_dp2_moe_with_checkpointing_bias_and_loss_scaler_equals_single_process(tmp_path):
    cfg = moe_cfg(moe={**MOE, "bias_update_rate": 0.01})
    check_layout(tmp_path, 2, cfg, {"fsdp": True, "ac": True, "reshard_after_forward": False, "loss_scaler": True},
                 grad_keys=("layers.1.mlp.router.gate.weight", "layers.1.mlp.experts.w13"))


@pytest.mark.multiproc
def test_fsdp_x_ep2_equals_single_process(tmp_path):
    # ep = dp = 2: every expert group has one member, so the experts stay plain (out of FSDP)
    check_layout(tmp_path, 2, moe_cfg(moe=MOE), {"fsdp": True, "ep": 2},
                 grad_keys=("layers.1.mlp.experts.w13", "layers.0.attn.wq.weight"))


@pytest.mark.multiproc
def test_fsdp_x_ep2_x_edp2_equals_single_process(tmp_path):
    # 4 ranks, ep=2: each expert group has two members, which must sum the expert gradients
    _, _, got = check_layout(tmp_path, 4, moe_cfg(moe=MOE), {"fsdp": True, "ep": 2},
                             grad_keys=("layers.1.mlp.experts.w13", "layers.1.mlp.experts.w2", "embed.weight"))
    assert all(got[r]["sharded"]["layers.1.mlp.experts.w13"] for r in range(4))


@pytest.mark.multiproc
def test_hsdp_degree2_of_dp4_dense_equals_single_process(tmp_path):
    # parallel.fsdp=2 on 4 ranks: sharded over pairs, the pairs replicated (reduce-scatter + all-reduce)
    _, _, got = check_layout(tmp_path, 4, dense_cfg(), {"fsdp": 2},
                             grad_keys=("layers.0.attn.wq.weight", "embed.weight"))
    assert all(got[r]["sharded"]["layers.0.attn.wq.weight"] for r in range(4))


# ------------------------------------------------------------------ checkpoints across layouts and sizes

def _phase(rank, world, layout, cfg, data, steps, load, save, out):
    """Build `layout` on `world` ranks, load `load` (model and AdamW state), train `steps`, save."""
    from cluster import checkpoint
    from cluster.train.optim import build_optimizer

    dims = ParallelDims.build(world, layout.get("ep", 1), num_experts(cfg), model_cfg=cfg)
    par = parallel.apply(build(cfg, seed=0 if load is None else 99), build_groups(dims, rank), CPU,
                         fsdp=layout.get("fsdp", False))
    opt = par.prepare_optimizer(build_optimizer(par.model, 1e-2, 0.1, (0.9, 0.95)))
    if load is not None:
        checkpoint.load(load, par.model, opt, cfg, rank, world)
    per = len(data[0]) // dims.dp
    dp_rank = dims.coords(rank)[1]
    losses = [train_step(par, ArrayLM(), data[s][dp_rank * per:(dp_rank + 1) * per], opt, DynamicLossScaler(False),
                         "fp32", CPU, 1.0, _moe_layout(cfg)).loss for s in steps]
    checkpoint.save(save, par.model, opt, {"step": steps[-1] + 1}, cfg, rank, world)
    if rank == 0:
        torch.save(losses, out)


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_checkpoints_round_trip_fsdp_single_ddp_ep_and_resize(tmp_path):
    """One run through four layouts and three world sizes, two AdamW steps each, each resuming
    from the last one's checkpoint: FSDP dp=2 (6 experts: whole experts per shard) -> 1 process ->
    EP=2 with DDP for the dense weights -> FSDP x EP=2 x EDP=2 on 4 ranks (3 experts per EP rank
    over 2 ranks: sharded inside the experts). The losses equal one straight single-process run:
    weights, AdamW moments and router biases all came through every resharding."""
    from cluster.train.optim import build_optimizer

    cfg = moe_cfg(moe={**MOE, "num_experts": 6, "bias_update_rate": 0.01})
    data = [mbs for step in step_data(1, 4, steps=8) for mbs in step]  # 4 micro-batches per step
    model = build(cfg)
    opt = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
    straight = [train_step(model, ArrayLM(), data[s], opt, DynamicLossScaler(False), "fp32", CPU, 1.0,
                           _moe_layout(cfg)).loss for s in range(8)]
    chain = [(2, {"fsdp": True}), (1, {}), (2, {"ep": 2}), (4, {"fsdp": True, "ep": 2})]
    got, load = [], None
    for i, (world, layout) in enumerate(chain):
        save, out, steps = tmp_path / f"ckpt{i}", tmp_path / f"losses{i}.pt", range(2 * i, 2 * i + 2)
        if world == 1:
            _phase(0, 1, layout, cfg, data, steps, load, save, out)
        else:
            spawn(_phase, world, layout, cfg, data, steps, load, save, out)
        got += torch.load(out, weights_only=True)
        load = save
    np.testing.assert_allclose(got, straight, rtol=0, atol=1e-5)
    # What jobs.generate / jobs.export read (cluster.deploy.load): the weights of the 4-rank FSDP save
    from cluster import checkpoint

    plain = build(cfg, seed=99)
    checkpoint.load_model_weights(load, plain, cfg)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, atol=1e-5, rtol=1e-4, msg=key)


# ------------------------------------------------------------------------ compositions on 4 ranks

@pytest.mark.multiproc
def test_fsdp_x_tp2_x_ep2_moe_with_shared_expert_equals_single_process(tmp_path):
    # dense weights: 2-D DTensors (dp_shard x tp); experts: sharded over their edp 1 x tp 2 group
    cfg = moe_cfg(moe={**MOE, "shared_expert_hidden": 16})
    _, _, got = check_layout(tmp_path, 4, cfg, {"tp": 2, "ep": 2, "fsdp": True},
                             grad_keys=("layers.1.mlp.router.gate.weight", "layers.1.mlp.shared.w1.weight",
                                        "layers.0.attn.wq.weight", "layers.1.mlp.experts.w13"))
    assert all(got[r]["sharded"]["layers.0.attn.wq.weight"] for r in range(4))


@pytest.mark.multiproc
def test_fsdp_x_pp2_dense_equals_single_process(tmp_path):
    check_layout(tmp_path, 4, dense_cfg(), {"pp": 2, "fsdp": True, "schedule": "1f1b"},
                 grad_keys=("layers.0.attn.wq.weight", "layers.1.mlp.w1.weight", "embed.weight"))


@pytest.mark.multiproc
def test_fsdp_x_pp2_x_ep2_moe_equals_single_process(tmp_path):
    cfg = moe_cfg(moe_layers=[1, 2], n_layers=3, moe=MOE)
    check_layout(tmp_path, 4, cfg, {"pp": 2, "ep": 2, "fsdp": True, "schedule": "1f1b"},
                 grad_keys=("layers.1.mlp.router.gate.weight", "layers.2.mlp.experts.w13", "embed.weight"))


# ------------------------------------------------------------------------ meta-device initialisation

def test_meta_init_equals_the_ordinary_build():
    """Built on meta and replayed: every parameter and buffer (RoPE tables, router biases) equals
    the ordinary build's for the same seed, bit for bit."""
    import archs
    from parallel.meta_init import expert_place, materialize, trace_build

    for cfg in (dense_cfg(), moe_cfg(moe={**MOE, "bias_update_rate": 0.01, "shared_expert_hidden": 16})):
        ref = build(cfg, seed=3)
        trace = trace_build(lambda: archs.build(cfg))
        assert all(p.is_meta for p in trace.model.parameters())
        materialize(trace, trace.model, 3, expert_place(trace.model))
        got, want = trace.model.state_dict(), ref.state_dict()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
        for (name, b), (_, rb) in zip(trace.model.named_buffers(), ref.named_buffers()):
            assert torch.equal(b, rb), name


def _meta_worker(rank, world, cfg, layouts, out):
    import archs
    from parallel.meta_init import expert_place, materialize, trace_build

    for i, layout in enumerate(layouts):
        dims = ParallelDims.build(world, layout.get("ep", 1), num_experts(cfg), model_cfg=cfg)
        ordinary = parallel.apply(build(cfg, seed=5), build_groups(dims, rank), CPU, fsdp=True)
        trace = trace_build(lambda: archs.build(cfg))
        meta = parallel.apply(trace.model, build_groups(dims, rank), CPU, fsdp=True)
        materialize(trace, meta.model, 5, expert_place(meta.model))
        want = dict(ordinary.model.named_parameters())
        for name, p in meta.model.named_parameters():
            local = p._local_tensor if hasattr(p, "_local_tensor") else p
            ref = want[name]._local_tensor if hasattr(want[name], "_local_tensor") else want[name]
            assert local.shape == ref.shape and torch.equal(local, ref), f"rank {rank} layout {i}: {name}"
        for (name, b), (_, rb) in zip(meta.model.named_buffers(), ordinary.model.named_buffers()):
            assert torch.equal(b, rb), f"rank {rank} layout {i}: buffer {name}"
        # and it trains: the same first step as the ordinarily built shards
        data = step_data(dims.dp, 1, steps=1)[0][dims.coords(rank)[1]]
        losses = [train_step(par, ArrayLM(), data, torch.optim.SGD(par.model.parameters(), lr=0.1),
                             DynamicLossScaler(False), "fp32", CPU, 1.0, _moe_layout(cfg)).loss for par in (ordinary, meta)]
        assert losses[0] == losses[1], losses
    if rank == 0:
        torch.save(True, out)


@pytest.mark.multiproc
def test_fsdp_meta_init_gives_each_rank_the_shards_of_the_ordinary_build(tmp_path):
    cfg = moe_cfg(moe={**MOE, "bias_update_rate": 0.01})
    spawn(_meta_worker, 2, cfg, [{}, {"ep": 2}], tmp_path / "ok.pt")
    assert torch.load(tmp_path / "ok.pt", weights_only=True)


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _memory_worker(rank, world, cfg, out):
    import archs
    from cluster.train import malloc
    from cluster.train.optim import build_optimizer
    from parallel.meta_init import expert_place, materialize, trace_build

    assert not malloc.active()
    dims = ParallelDims.build(world, 1, num_experts(cfg), model_cfg=cfg)
    groups = build_groups(dims, rank)
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    base = _status_bytes("VmRSS")
    trace = trace_build(lambda: archs.build(cfg))
    par = parallel.apply(trace.model, groups, CPU, fsdp=True)
    materialize(trace, par.model, 0, expert_place(par.model))
    built = _status_bytes("VmHWM") - base
    opt = build_optimizer(par.model, 1e-3, 0.0, (0.9, 0.95))
    data = step_data(dims.dp, 1, steps=1)[0][dims.coords(rank)[1]]
    train_step(par, ArrayLM(), data, opt, DynamicLossScaler(False), "fp32", CPU, 1.0, _moe_layout(cfg))
    trained = _status_bytes("VmHWM") - base
    torch.save({"built": built, "trained": trained}, f"{out}/mem{rank}.pt")


@pytest.mark.multiproc
def test_fsdp_meta_init_peak_memory_stays_below_the_unsharded_model(tmp_path, monkeypatch):
    """An MoE model of 27 M parameters (108 MB in fp32; with gradients and AdamW state 430 MB) on 2
    FSDP ranks: each rank's peak resident memory above its start (VmHWM) stays below the full
    weights alone while building (it holds half of them plus one full tensor at a time, and the
    process groups' and FSDP's own buffers), and below
    the unsharded weights + gradients + AdamW state after a training step. glibc's own default
    malloc, with a fixed mmap threshold so that freed blocks go back (the caching-malloc settings of
    cluster/train/malloc.py would keep them)."""
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    cfg = moe_cfg(moe={**MOE, "num_experts": 8, "expert_hidden": 1024}, d_model=256, n_layers=4, n_heads=4,
                  d_ff=512, max_seq_len=64)
    n_params = sum(p.numel() for p in build(cfg).parameters())
    weights = 4 * n_params
    ranks.run_fresh(_memory_worker, 2, cfg, str(tmp_path))  # a new process: VmHWM from zero
    for rank in range(2):
        got = torch.load(tmp_path / f"mem{rank}.pt", weights_only=True)
        assert got["built"] < weights, (rank, got, weights)
        assert got["trained"] < 4 * weights, (rank, got, weights)
        print(f"rank {rank}: {n_params / 1e6:.1f} M parameters ({weights / 2**20:.0f} MiB); peak above start "
              f"{got['built'] / 2**20:.0f} MiB built, {got['trained'] / 2**20:.0f} MiB after an AdamW step")
