"""The reused gloo ranks (tests/ranks.py): a failing rank's error reaches the test, and the pool
that had to be torn down for it serves the next test."""
import pytest
import torch
import torch.distributed as dist

from tests import ranks

pytestmark = pytest.mark.multiproc


def _fails_on_rank1(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits here for the rank that failed


def _sum_ranks(rank, world, out):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    if rank == 0:
        torch.save(t, out)


def test_a_failing_rank_is_raised_and_the_next_call_runs(tmp_path):
    with pytest.raises(RuntimeError, match="(?s)rank 1 of 2 failed in .*_fails_on_rank1.*boom on rank 1"):
        ranks.run(_fails_on_rank1, 2)
    ranks.run(_sum_ranks, 2, str(tmp_path / "sum.pt"))
    assert torch.load(tmp_path / "sum.pt", weights_only=True).item() == 1.0
