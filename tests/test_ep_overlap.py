"""`parallel.ep_overlap_chunks`: the chunked, overlapped exchange against the one-exchange path.

Both run on the same spawned 2-process gloo group: the overlapped dispatcher must give the same
outputs and gradients (uneven, empty and all-to-one splits, with and without capacity dropping),
and the same losses, drop fractions and weights over several training steps.
"""
import numpy as np
import pytest
import torch

from cluster.train.precision import DynamicLossScaler
from cluster.train.step import train_step
from moe.layer import moe_layers
from moe.router import Routing
from parallel.data_parallel import apply_data_parallel
from parallel.expert_parallel import (AllToAllDispatcher, OverlappedAllToAllDispatcher, apply_expert_parallel,
                                      chunk_counts)
from parallel.mesh import ParallelDims, build_groups
from tests.test_expert_parallel import build, model_cfg, rank_batches, sgd, spawn
from tests.test_step import CPU, ArrayLM

pytestmark = pytest.mark.multiproc
CASES = ["random", "empty_experts", "all_to_one", "empty_rank"]


def test_chunk_counts_cut_each_expert_into_near_equal_pieces():
    sizes = torch.tensor([0, 1, 5, 7])
    counts = chunk_counts(sizes, 3)
    assert counts.sum(0).tolist() == sizes.tolist()
    assert counts.t().tolist() == [[0, 0, 0], [1, 0, 0], [2, 2, 1], [3, 2, 2]]
    # The rule the dispatcher uses for each row: position p of expert e goes to chunk p*K // size.
    for e, s in enumerate(sizes.tolist()):
        assert torch.bincount(torch.arange(s) * 3 // max(s, 1), minlength=3).tolist() == counts[:, e].tolist()


def _routing(rank, case, N, E, k):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(N, 3, generator=gen, requires_grad=True)
    if case == "all_to_one":
        expert_A = torch.zeros(N * k, dtype=torch.long)
    elif case == "empty_experts":
        expert_A = torch.randint(0, 2, (N * k,), generator=gen)  # experts 2, 3 (all of rank 1) get nothing
    elif case == "empty_rank":
        n = 0 if rank == 1 else N  # rank 1 has no tokens at all
        x = x[:n].detach().requires_grad_()
        N = n
        expert_A = torch.randint(0, E, (N * k,), generator=gen)
    else:
        expert_A = torch.randint(0, E, (N * k,), generator=gen)
    weight_A = torch.rand(N * k, generator=gen, requires_grad=True)
    priority = torch.rand(N * k, generator=gen)
    routing = Routing(token_A=torch.arange(N).repeat_interleave(k), expert_A=expert_A, weight_A=weight_A,
                      priority_A=priority, probs_NE=torch.zeros(N, E), logits_NE=torch.zeros(N, E),
                      counts_E=torch.bincount(expert_A, minlength=E), capacity_bounded=False)
    return x, routing


def _dispatch_worker(rank, world, out):
    E, N, k = 4, 13, 2
    groups = build_groups(ParallelDims.build(world, world, E), rank)
    n_local, offset = E // world, rank * (E // world)
    scale = torch.arange(1.0, E + 1)

    def experts(x_MC, group_sizes_E, weight_M):  # expert e: (e + 1) * x * weight, then a nonlinearity
        expert_of_row = torch.repeat_interleave(torch.arange(n_local) + offset, group_sizes_E)
        return torch.tanh(x_MC * scale[expert_of_row, None]) * weight_M[:, None]

    results = {}
    for case in CASES:
        for cap in (None, 3):
            for policy in ("score", "position"):
                x, routing = _routing(rank, case, N, E, k)
                plain = AllToAllDispatcher(groups.ep, world, n_local)
                d = plain.dispatch(x, routing, cap, policy)
                want = plain.combine(experts(d.x_MC, d.group_sizes_E, d.weight_M), d, x.shape[0])
                want_g = torch.autograd.grad(want.square().sum(), (x, routing.weight_A), allow_unused=True)
                for chunks in (2, 5):
                    got, dropped = OverlappedAllToAllDispatcher(groups.ep, world, n_local, chunks).dispatch_compute_combine(
                        x, routing, cap, policy, experts)
                    got_g = torch.autograd.grad(got.square().sum(), (x, routing.weight_A), allow_unused=True)
                    results[(case, cap, policy, chunks)] = (want.detach(), got.detach(), int(d.dropped), int(dropped),
                                                            want_g, got_g)
    torch.save(results, f"{out}/rank{rank}.pt")


def test_overlapped_dispatcher_equals_one_exchange(tmp_path):
    spawn(_dispatch_worker, 2, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert len(got) == len(CASES) * 2 * 2 * 2
        for key, (want, out, want_drop, drop, want_g, got_g) in got.items():
            msg = f"rank {rank} {key}"
            torch.testing.assert_close(out, want, msg=msg)
            assert drop == want_drop, msg
            for a, b in zip(got_g, want_g):
                assert (a is None) == (b is None), msg
                if a is not None:
                    torch.testing.assert_close(a, b, msg=msg)
        assert any(v[2] > 0 for k, v in got.items() if k[1] is not None), "capacity never dropped: a weak test"


def _train_worker(rank, world, cfgs, data, out):
    results = {}
    for (name, cfg), chunks in [(c, k) for c in cfgs.items() for k in (1, 3)]:
        groups = build_groups(ParallelDims.build(world, world, cfg.moe.num_experts), rank)
        model = build(cfg)
        apply_expert_parallel(model, groups, overlap_chunks=chunks)
        kind = type(moe_layers(model)[0].dispatcher)
        ddp = apply_data_parallel(model, CPU)
        opt = sgd(model)
        res = [train_step(ddp, ArrayLM(), [data[s][rank]], opt, DynamicLossScaler(False), "fp32", CPU, 1.0)
               for s in range(len(data))]
        results[name, chunks] = {"kind": kind.__name__, "losses": [r.loss for r in res], "aux": [r.aux_loss for r in res],
                           "dropped": [[layer["dropped_frac"] for layer in r.moe["layers"]] for r in res],
                           "state": {k: v.clone() for k, v in model.state_dict().items()}}
        del ddp
    torch.save(results, f"{out}/rank{rank}.pt")


def test_training_with_overlap_equals_without(tmp_path):
    cfgs = {"dropless": model_cfg(), "capacity": model_cfg(capacity_factor=0.5, min_capacity=1)}
    spawn(_train_worker, 2, cfgs, rank_batches(2, steps=4), str(tmp_path))
    for rank, name in [(r, n) for r in range(2) for n in cfgs]:
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        plain, over, moe = got[name, 1], got[name, 3], name == "capacity"
        assert (plain["kind"], over["kind"]) == ("AllToAllDispatcher", "OverlappedAllToAllDispatcher")
        np.testing.assert_allclose(over["losses"], plain["losses"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(over["aux"], plain["aux"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(over["dropped"], plain["dropped"])
        if moe:
            assert any(f > 0 for step in plain["dropped"] for f in step), "capacity never dropped: a weak test"
        for key, value in over["state"].items():
            torch.testing.assert_close(value, plain["state"][key], atol=1e-5, rtol=1e-4, msg=f"rank {rank}: {key}")
