"""The distributed test helper itself: results come back, failures and hangs are reported."""

import pytest
import torch
import torch.distributed as dist
from dist import RankFailed, run_on_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _tensor_of_rank(rank, world_size):
    return torch.full((1000, 1000), float(rank))


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


def _hang_on_one(rank, world_size):
    if rank == 1:
        import time

        time.sleep(60)
    return rank


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_ranks_run_and_reduce(world_size):
    assert run_on_ranks(_sum_ranks, world_size) == [sum(range(world_size))] * world_size


def test_tensors_come_back_from_the_ranks():
    results = run_on_ranks(_tensor_of_rank, 2)
    for rank, t in enumerate(results):
        torch.testing.assert_close(t, torch.full((1000, 1000), float(rank)))


def test_a_rank_exception_fails_with_its_traceback():
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2 failed.*rank one is broken"):
        run_on_ranks(_fail_on_one, 2)


def test_a_hanging_rank_times_out():
    with pytest.raises(RankFailed, match=r"did not finish within 2"):
        run_on_ranks(_hang_on_one, 2, timeout=2)
