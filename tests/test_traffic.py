"""The communication model (shardflow.distributed.traffic) against counted traffic, on 4 gloo
ranks as HSDP 2x2 and as 1-D FSDP2 (``fully_shard`` per layer, then the root), DolphinFlow in
``matrix`` and ``block`` mode: bytes sent per rank for the second step (forward, backward and
``optimizer.step()``), per collective, exactly (the issue's target is 5%; the model counts
FSDP2's padding and the owner plan's splits as they are; bench/comm_model.py also checks W = 2
and the DDP-aware plan). The HSDP all-reduce appears under HSDP only (tests/test_hsdp.py checks
that no collective of the optimizer's step leaves the shard group).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401 - imported once here, not by every forked rank (seconds each)
from dist import run_on_ranks
from test_hsdp import _loss, _mesh, _sharded

from shardflow import DolphinFlow
from shardflow.distributed import traffic
from shardflow.distributed.comm import record_collectives
from shardflow.distributed.placement import plan_inputs

NAMES = {
    "all_gather_single": "FSDP2 all-gather",
    "reduce_scatter_single": "FSDP2 reduce-scatter",
    "all_reduce": "HSDP all-reduce",
    "all_to_all_single": "NS all-to-all (2 rounds)",
}
MODES = {"matrix": {"ortho_mode": "matrix"}, "block": {"ortho_mode": "block", "block_size": 4}}


def _count(rank, world, hsdp):
    """Per mode: counted bytes sent by collective, and the model's prediction."""
    out = {}
    for mode, options in MODES.items():
        mesh = _mesh(world, hsdp)
        model = _sharded(mesh)
        opt = DolphinFlow(model.parameters(), lr=1e-2, process_group=mesh, **options)
        params, _, tiles = plan_inputs(opt.param_groups, opt._ns_tile)
        shapes = [traffic.Param(tuple(p.shape), p.element_size(), t) for p, t in zip(params, tiles)]
        shard = opt.placement.world_size
        for step in (1, 2):
            with record_collectives() as log:
                _loss(model, step, rank, world).backward()
                opt.step()
                opt.zero_grad()
        counted: dict[str, int] = {}
        for name, sent, _ in log.calls:
            if name == "all_reduce" and sent < 64:  # scalar sums (norms): not modelled
                continue
            counted[NAMES[name]] = counted.get(NAMES[name], 0) + sent
        predicted = traffic.sharded_step(
            shapes, shard=shard, replicas=world // shard, rank=opt.placement.rank
        )
        out[mode] = (counted, {t.collective: t.sent for t in predicted})
    return out


@pytest.mark.parametrize("hsdp", [True, False], ids=["hsdp-2x2", "fsdp-4"])
def test_model_predicts_the_counted_bytes(hsdp):
    for rank, result in enumerate(run_on_ranks(_count, 4, hsdp)):
        for mode, (counted, predicted) in result.items():
            assert predicted == counted, (rank, mode)
            assert ("HSDP all-reduce" in counted) == hsdp
