"""DolphinFlow's compiled pass on real placements equals it on one device.

The compiled pass reads the raw gradients and takes the ⊥Grad row sums from the clipping-norm
pass (``DolphinFlow._local_sq_norm``); under FSDP2 those are a shard's rows and the norm a
partial sum, under the DDP-aware owner plan a rank holds whole parameters or nothing. Both must
give the single-device result: 2 gloo ranks, 6 steps of the tiny model of test_sharding.py,
rowwise and flat ⊥Grad (flat: the rows' sums are added over the ranks holding rows).

Tolerance ``FP32_ATOL = 1e-6`` as in test_sharding.py (the runs differ only in the order of
floating-point sums; weights of order 1, ulp 1.2e-7).
"""

from __future__ import annotations

import pytest
from dist import run_on_ranks
from test_sharding import (
    FP32_ATOL,
    LR,
    _max_diff,
    batch,
    full_params,
    groups,
    loss_of,
    make_model,
    train_sharded,
)

from shardflow import DolphinFlow

# torch.compile in every rank process: 10-12 min under load, nightly (bash launch/test.sh -m slow)
pytestmark = pytest.mark.slow

STEPS = 6
CONFIGS = [{"ortho_mode": "vector"}, {"ortho_mode": "vector", "vector_mode": "flat"}]


def _single_device(config: dict) -> dict:
    model = make_model()
    opt = DolphinFlow(groups(model), lr=LR, compiled=True, **config)
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, batch(step)).backward()
        opt.step()
    return full_params(model)


def _runs(rank, world, kinds):
    out = {}
    for kind in kinds:
        for ci, config in enumerate(CONFIGS):
            model, _, _ = train_sharded(
                kind, {**config, "compiled": True}, rank, world, steps=STEPS
            )
            out[(kind, ci)] = full_params(model)
    refs = {ci: _single_device(c) for ci, c in enumerate(CONFIGS) if ci % world == rank}
    return (out if rank == 0 else None), refs


@pytest.mark.parametrize("world", [2, 4])
def test_compiled_dolphinflow_on_placements_matches_single_device(world):
    ranks = run_on_ranks(_runs, world, ("ddp_unwrapped", "fsdp"), timeout=600)
    references = {ci: ref for _, refs in ranks for ci, ref in refs.items()}
    start = full_params(make_model())
    failed = []
    for (kind, ci), params in ranks[0][0].items():
        assert _max_diff(references[ci], start) > 2 * LR, "the reference run must move the weights"
        diff = _max_diff(params, references[ci])
        print(kind, CONFIGS[ci], f"max |Δ| = {diff:.2g}")
        if diff > FP32_ATOL:
            failed.append(f"{kind} {CONFIGS[ci]}: max |Δ| = {diff:.3g} > {FP32_ATOL:.3g}")
    assert not failed, failed
