"""Expert parallelism on gloo process groups against the single-process reference.

The reference applies the unsharded model to every rank's micro-batch in turn (routing, capacity
and the auxiliary losses are per micro-batch) and averages the gradients: exactly `train_step`
over the ranks' batches as micro-batches.
"""

import numpy as np
import pytest
import torch

import archs
from archs.moe_transformer import PRESETS, MoETransformerConfig
from cluster import checkpoint
from cluster.train.precision import DynamicLossScaler
from cluster.train.step import train_step
from moe.config import MoEConfig
from moe.dispatcher import LocalDispatcher
from moe.router import Routing
from moe.layer import moe_layers
from parallel.data_parallel import apply_data_parallel
from parallel.expert_parallel import AllToAllDispatcher, apply_expert_parallel, source_to_expert_major
from parallel.mesh import ParallelDims, build_groups
from tests import ranks
from tests.test_moe import batches
from tests.test_step import CPU, ArrayLM

pytestmark = pytest.mark.multiproc
STEPS = 10


def spawn(fn, world, *args):
    """fn(rank, world, *args) on `world` gloo ranks (reused processes: tests/ranks.py)."""
    ranks.run(fn, world, *args)


def model_cfg(**moe):
    base = dict(PRESETS["debug"])
    return MoETransformerConfig(**{**base, "moe": MoEConfig(**{**base["moe"], "backend": "loop", **moe})}, vocab_size=50)


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return archs.build(cfg)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.2)


def rank_batches(world, steps=STEPS):
    """Per step, one 2-row micro-batch per rank."""
    return [[b[2 * r:2 * r + 2] for r in range(world)] for b in batches(steps, seed=3)]


def reference(cfg, data, steps):
    model = build(cfg)
    opt = sgd(model)
    results = [train_step(model, ArrayLM(), data[s], opt, DynamicLossScaler(False), "fp32", CPU, 1.0) for s in range(steps)]
    return model, results


def _ep_worker(rank, world, ep, cfg, data, out):
    groups = build_groups(ParallelDims.build(world, ep, cfg.moe.num_experts), rank)
    model = build(cfg)
    apply_expert_parallel(model, groups)
    ddp = apply_data_parallel(model, CPU)
    opt = sgd(model)
    res = [train_step(ddp, ArrayLM(), [data[s][rank]], opt, DynamicLossScaler(False), "fp32", CPU, 1.0)
           for s in range(len(data))]
    torch.save({"losses": [r.loss for r in res], "aux": [r.aux_loss for r in res],
                "dropped": [[layer["dropped_frac"] for layer in r.moe["layers"]] for r in res],
                "state": model.state_dict(), "offset": moe_layers(model)[0].experts.expert_offset}, f"{out}/rank{rank}.pt")


def check_against_reference(tmp_path, world, ep, **moe):
    cfg = model_cfg(**moe)
    data = rank_batches(world)
    ref_model, ref = reference(cfg, data, STEPS)
    spawn(_ep_worker, world, ep, cfg, data, str(tmp_path))
    ref_state = ref_model.state_dict()
    n_local = cfg.moe.num_experts // ep
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        np.testing.assert_allclose(got["losses"], [r.loss for r in ref], rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["aux"], [r.aux_loss for r in ref], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["dropped"], [[layer["dropped_frac"] for layer in r.moe["layers"]] for r in ref])
        for key, value in got["state"].items():
            want = ref_state[key]
            if ".experts." in key:  # this rank's slice of the experts
                want = want[got["offset"]:got["offset"] + n_local]
            torch.testing.assert_close(value, want, atol=1e-5, rtol=1e-4, msg=f"rank {rank}: {key}")


def test_ep2_equals_single_process_dropless(tmp_path):
    check_against_reference(tmp_path, world=2, ep=2)


def test_ep2_with_capacity_dropping_makes_the_same_decisions(tmp_path):
    check_against_reference(tmp_path, world=2, ep=2, capacity_factor=0.5, min_capacity=1, bias_update_rate=1e-3)


def test_ep2_times_expert_data_parallel2_reduces_expert_grads_over_the_right_group(tmp_path):
    # With 2 ranks the expert-data-parallel group has one member, so a missing (or wrong-group)
    # expert gradient reduction would go unseen; 4 ranks = EP 2 x EDP 2 catches it.
    check_against_reference(tmp_path, world=4, ep=2)


# ------------------------------------------------------------------------------ the dispatcher

def _roundtrip_worker(rank, world, case, out):
    E, N, C = 4, 12, 3
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(N, C, generator=gen, requires_grad=True)
    k = 2
    if case == "all_to_one":
        expert_A = torch.zeros(N * k, dtype=torch.long)
    elif case == "empty_experts":
        expert_A = torch.randint(0, 2, (N * k,), generator=gen)  # experts 2, 3 (all of rank 1) get nothing
    else:
        expert_A = torch.randint(0, E, (N * k,), generator=gen)
    weight_A = torch.rand(N * k, generator=gen, requires_grad=True)
    routing = Routing(token_A=torch.arange(N).repeat_interleave(k), expert_A=expert_A, weight_A=weight_A,
                      priority_A=weight_A.detach(), probs_NE=torch.zeros(N, E), logits_NE=torch.zeros(N, E),
                      counts_E=torch.bincount(expert_A, minlength=E), capacity_bounded=False)
    scale = torch.arange(1.0, E + 1)  # expert e multiplies its rows by (e + 1) and its weight

    def run(dispatcher, offset, n_local):
        d = dispatcher.dispatch(x, routing, None, "score")
        expert_of_row = torch.repeat_interleave(torch.arange(n_local) + offset, d.group_sizes_E)
        y = d.x_MC * scale[expert_of_row, None] * d.weight_M[:, None]
        out = dispatcher.combine(y, d, N)
        gx, gw = torch.autograd.grad(out.square().sum(), (x, weight_A))
        return out.detach(), gx, gw

    groups = build_groups(ParallelDims.build(world, world, E), rank)
    ep = run(AllToAllDispatcher(groups.ep, world, E // world), rank * (E // world), E // world)
    local = run(LocalDispatcher(), 0, E)
    torch.save({"ep": ep, "local": local}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("case", ["random", "empty_experts", "all_to_one"])
def test_all_to_all_dispatcher_equals_local(tmp_path, case):
    spawn(_roundtrip_worker, 2, case, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for a, b in zip(got["ep"], got["local"]):
            torch.testing.assert_close(a, b)


def test_source_to_expert_major_permutation():
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])  # [source, local expert]
    # received rows: s0e0 s0e0 s0e2 | s1e0 s1e1 s1e1 s1e1  -> e0: 0 1 3, e1: 4 5 6, e2: 2
    assert source_to_expert_major(counts).tolist() == [0, 1, 3, 4, 5, 6, 2]


# ------------------------------------------------------------------- checkpoints across EP sizes

def _ep2_resume(rank, world, cfg, data, ckpt_in):
    """Steps 3-5 at EP=2 from the step-3 checkpoint `ckpt_in`: (model, optimizer, losses)."""
    groups = build_groups(ParallelDims.build(world, 2, cfg.moe.num_experts), rank)
    model = build(cfg, seed=99)  # a different init: everything must come from the checkpoint
    apply_expert_parallel(model, groups)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    checkpoint.load(ckpt_in, model, opt, cfg, rank, world)
    ddp = apply_data_parallel(model, CPU)
    losses = [train_step(ddp, ArrayLM(), [data[s][rank]], opt, DynamicLossScaler(False), "fp32", CPU, 1.0).loss
              for s in range(3, 6)]
    return model, opt, losses


def _ckpt_worker(rank, world, cfg, data, ckpt_in, ckpt_out, out):
    model, opt, losses = _ep2_resume(rank, world, cfg, data, ckpt_in)
    checkpoint.save(ckpt_out, model, opt, {"step": 6}, cfg, rank, world)
    torch.save(losses, f"{out}/rank{rank}.pt")


def _straight_and_saved_at_3(cfg, data, path):
    """The single-process losses over all of `data`, and the model of a second run saved to
    `path` after 3 steps."""
    model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    straight = [train_step(model, ArrayLM(), batch, opt, DynamicLossScaler(False), "fp32", CPU, 1.0).loss
                for batch in data]
    model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(3):
        train_step(model, ArrayLM(), data[s], opt, DynamicLossScaler(False), "fp32", CPU, 1.0)
    checkpoint.save(path, model, opt, {"step": 3}, cfg, 0, 1)
    return straight, model


def test_checkpoint_reshards_between_ep1_and_ep2(tmp_path):
    """1 process trains 3 steps and saves; EP=2 resumes for 3 steps and saves; 1 process resumes
    for 3 more. Losses equal a straight single-process run (AdamW state included)."""
    cfg = model_cfg(capacity_factor=1.0)
    data = rank_batches(2, steps=9)
    straight, _ = _straight_and_saved_at_3(cfg, data, tmp_path / "ep1")
    spawn(_ckpt_worker, 2, cfg, data, str(tmp_path / "ep1"), str(tmp_path / "ep2"), str(tmp_path))
    ep_losses = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert checkpoint.verify(tmp_path / "ep2")["world_size"] == 2  # both ranks' manifests check out
    model = build(cfg, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    checkpoint.load(tmp_path / "ep2", model, opt, cfg, 0, 1)
    tail = [train_step(model, ArrayLM(), data[s], opt, DynamicLossScaler(False), "fp32", CPU, 1.0).loss
            for s in range(6, 9)]
    np.testing.assert_allclose(ep_losses + tail, straight[3:], rtol=0, atol=1e-4)


def _bucket_ckpt_worker(rank, world, cfg, data, uri, env, out):
    """_ckpt_worker's resume, from a checkpoint in the bucket, counting what this rank read."""
    import os

    os.environ.update(env)
    reads = []
    real = checkpoint.dcp_load
    checkpoint.dcp_load = lambda *a, **k: reads.append(real(*a, **k)) or reads[-1]
    try:
        _, _, losses = _ep2_resume(rank, world, cfg, data, uri)
    finally:
        checkpoint.dcp_load = real
    torch.save({"losses": losses, "bytes": reads[0].bytes_read}, f"{out}/rank{rank}.pt")


def test_ep2_resumes_from_a_bucket_each_rank_reading_only_its_own_experts(tmp_path, s3):
    """The EP=2 resume of the test above, from a checkpoint in the bucket (moto): the same losses
    as the straight run, and each rank reads its half of the experts by range, not the checkpoint."""
    from cluster.data import storage
    from tests.storage_server import BUCKET

    cfg = model_cfg(capacity_factor=1.0)
    data = rank_batches(2, steps=6)
    local = tmp_path / "ep1"
    straight, model = _straight_and_saved_at_3(cfg, data, local)
    remote = storage.locate(f"s3://{BUCKET}/ep-resume/{checkpoint.dir_name(3)}")
    for f in local.iterdir():
        remote.join(f.name).write_bytes(f.read_bytes())
    spawn(_bucket_ckpt_worker, 2, cfg, data, remote.uri, s3.env, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    np.testing.assert_allclose(got[0]["losses"], straight[3:], rtol=0, atol=1e-4)
    shards = sum(f.stat().st_size for f in local.glob("*.distcp"))
    experts = sum(p.numel() * p.element_size() * 3 for n, p in model.named_parameters() if ".experts." in n)
    for g in got:  # all of the dense part and half of the experts (weights and both AdamW moments)
        assert g["bytes"] < shards - 0.4 * experts, (g["bytes"], shards, experts)


def _stats_worker(rank, world, out):
    from moe.layer import MoELayer
    from moe.stats import finish_step
    torch.manual_seed(0)
    layers = [MoELayer(8, MoEConfig(num_experts=4, top_k=2, expert_hidden=8, bias_update_rate=1e-2), layer_id=i)
              for i in (1, 3)]
    held = layers if rank == 0 else []  # rank 1 holds no MoE layer (e.g. a pipeline stage)
    for layer in held:
        layer.train()(torch.randn(1, 6, 8))
    summary = finish_step(held, CPU, layer_ids=[1, 3], num_experts=4)
    torch.save(summary, f"{out}/rank{rank}.pt")


def test_statistics_reduction_has_a_fixed_shape_on_ranks_without_moe_layers(tmp_path):
    spawn(_stats_worker, 2, str(tmp_path))  # would hang if rank 1 skipped the all-reduce
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert [layer["layer"] for layer in s1["layers"]] == [1, 3]
    assert [layer["tokens_per_expert"] for layer in s1["layers"]] == [layer["tokens_per_expert"] for layer in s0["layers"]]
    assert sum(s0["layers"][0]["tokens_per_expert"]) == 12
