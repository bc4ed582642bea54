"""Gradient release under the DDP-aware owner plan, on real gloo ranks, equals one process.

Each rank runs backward on its own quarter/half of the batch; release hooks send each bucket's
gradients to their owners (one all-to-all per dtype), the owners update, and ``step()``
all-gathers the weights. The single-process reference takes the ordinary step on the whole
batch (the mean of equal-sized shard losses is the whole batch's loss). Float64 runs differ only
in the order of the gradient average: ``TOL = 1e-9`` over 4 steps (matrix modes carry it through
Newton-Schulz). Records without a float64 path run in float32 at 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist import run_on_ranks
from optim_table import case_id, cases, skip_reason

from shardflow import prepare_for_gradient_release
from shardflow.distributed.comm import record_collectives

CASES = cases()
FIRST = [c for i, c in enumerate(CASES) if i == 0 or CASES[i - 1][0] is not c[0]]
RUNS = [(c, 2) for c in CASES] + [(c, 4) for c in FIRST]
"""Every config at W = 2; each record's first config at W = 4 too."""
STEPS = 4
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def _model(dtype, depth=2, seed=0):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(12, 20), torch.nn.Tanh()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(20, 20), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(20, 7, bias=False)).to(dtype)


def _batch(step, dtype, rank=0, world=1):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 12, generator=g), torch.randn(16, 7, generator=g)
    rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
    return x[rows].to(dtype), y[rows].to(dtype)


def _train(model, opt, dtype, rank=0, world=1):
    for step in range(STEPS):
        x, y = _batch(step, dtype, rank, world)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _dtype(record):
    return torch.float64 if record.float64 else torch.float32


def _released(rank, world, record, config, buckets):
    dtype = _dtype(record)
    model = _model(dtype)
    opt = record.factory(model.parameters(), process_group=dist.group.WORLD, **config)
    prepare_for_gradient_release(model, opt, buckets=buckets)
    _train(model, opt, dtype, rank, world)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(("case", "world"), RUNS, ids=[f"W{w}-{case_id(c)}" for c, w in RUNS])
def test_release_on_the_owner_plan_equals_one_process(case, world):
    record, config = case
    reason = skip_reason(record)
    if reason:
        pytest.skip(reason)
    config = {**config, "gradient_clipping": None}
    dtype = _dtype(record)
    ref_model = _model(dtype)
    _train(ref_model, record.factory(ref_model.parameters(), **config), dtype)
    expected = [p.detach() for p in ref_model.parameters()]
    # "param" buckets: one all-to-all per parameter, owners spread over the ranks
    results = run_on_ranks(_released, world, record, config, "param")
    for got in results:
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def _count(rank, world, depth, buckets):
    model = _model(torch.float64, depth)
    import shardflow  # noqa: PLC0415

    opt = shardflow.DolphinFlow(
        model.parameters(), lr=1e-2, ortho_mode="matrix", process_group=dist.group.WORLD
    )
    prepare_for_gradient_release(model, opt, buckets=buckets)
    x, y = _batch(0, torch.float64, rank, world)
    torch.nn.functional.mse_loss(model(x), y).backward()  # the first step (warm)
    opt.step()
    with record_collectives() as log:
        for step in range(1, 3):
            x, y = _batch(step, torch.float64, rank, world)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    return log.count / 2, sum(1 for _ in model.parameters())


def test_collectives_per_step_grow_with_buckets_not_parameters():
    """Per bucket: one all-to-all (one gradient dtype) and one all-reduce (its norm: NaN/inf
    and clipping); per step: one all-reduce of the pending flags and one all-gather."""
    big = 2**30
    (small, n_small), _ = run_on_ranks(_count, 2, 2, big)
    (large, n_large), _ = run_on_ranks(_count, 2, 8, big)
    assert n_large > 3 * n_small
    assert small == large == 2 + 2
    (per_param, n), _ = run_on_ranks(_count, 2, 2, "param")
    assert per_param == 2 * n + 2


def _refused(rank, world):
    import shardflow  # noqa: PLC0415

    model = _model(torch.float64)
    with pytest.raises(ValueError, match="grads_reduced=True is not supported"):
        shardflow.DolphinFlow(
            model.parameters(),
            process_group=dist.group.WORLD,
            grads_reduced=True,
            gradient_release=True,
        )
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = shardflow.DolphinFlow(model.parameters(), process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="DistributedDataParallel wrapper"):
        prepare_for_gradient_release(ddp, opt)
    assert opt.release is None
    return True


def test_ddp_wrapper_and_grads_reduced_are_refused():
    assert run_on_ranks(_refused, 2) == [True, True]
