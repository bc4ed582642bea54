"""DolphinFlow in matrix mode on FSDP2 (gloo, CPU): save, reshard, resume, with Newton-Schulz on owners.

Every optimizer in the table goes through both placements in tests/test_checkpoint_placed.py
(save at 2, load at 1, 2, 4); this adds what that does not: matrix mode, whose Newton-Schulz
inputs travel to their owner rank in bf16, and a checkpoint saved at W=4 resumed at W=2.
FSDP2 shards (``ShardedPlacement``; uneven, and an empty shard at W=4): N steps, save, load at W′
— the same W (bitwise equal to the uninterrupted run), 2→4, 4→2, 2→1 (a plain single process),
and across placements (FSDP2 → owner plan) — then M more steps, equal to N+M steps of the
single-process reference within the sharding tolerance.
"""

from __future__ import annotations

import pytest
import torch
from dist import place, run_on_ranks

import shardflow.checkpoint as ck
from shardflow import DolphinFlow

pytest.importorskip("shardflow.distributed.sharded")

BATCH = 8
# Owners average gradients and reduce-scatter sums in another order than one process; matrix
# mode's Newton-Schulz travels in bf16 to its owner (wire_dtype), so it gets a looser bound.
TOL = {"vector": dict(rtol=1e-5, atol=1e-6), "matrix": dict(rtol=2e-2, atol=2e-4)}
CONFIGS = {"vector": dict(lr=1e-2), "matrix": dict(lr=1e-2, ortho_mode="matrix")}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _train(model, opt, steps, start=0, rank=0, world=1):
    for step in range(start + 1, start + steps + 1):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank::world]), y[rank::world]).backward()
        opt.step()


def _full(model):
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist()
        for n, p in model.named_parameters()
    }


def _placed(placement, world, mode):
    model = _model()
    group = place(model, placement, world)
    return model, DolphinFlow(model.parameters(), process_group=group, **CONFIGS[mode])


def _run(rank, world, placement, mode, load_from, save_to, steps, start):
    model, opt = _placed(placement, world, mode)
    if load_from is not None:
        assert ck.load(load_from, model=model, optimizer=opt) == {"step": start}
    _train(model, opt, steps, start=start, rank=rank, world=world)
    if save_to is not None:
        ck.save(save_to, model=model, optimizer=opt, extra={"step": start + steps})
    return _full(model)


def _reference(mode, steps):
    model = _model()
    opt = DolphinFlow(model.parameters(), **CONFIGS[mode])
    _train(model, opt, steps)
    return {n: p.detach() for n, p in model.named_parameters()}


def _close(got, expected, mode):
    for name, value in expected.items():
        torch.testing.assert_close(torch.tensor(got[name]), value, **TOL[mode])


def test_fsdp2_resumes_at_2_4_and_1_and_into_the_owner_plan(tmp_path):
    mode = "matrix"
    a, b = tmp_path / "a", tmp_path / "b"
    run_on_ranks(_run, 2, "fsdp", mode, None, a, 3, 0)
    uninterrupted = run_on_ranks(_run, 2, "fsdp", mode, None, None, 5, 0)[0]
    same_w = run_on_ranks(_run, 2, "fsdp", mode, a, None, 2, 3)[0]
    assert same_w == uninterrupted  # bitwise at the same world size
    expected = _reference(mode, 5)
    _close(run_on_ranks(_run, 4, "fsdp", mode, a, b, 2, 3)[0], expected, mode)  # 2 → 4
    _close(run_on_ranks(_run, 2, "ddp", mode, a, None, 2, 3)[0], expected, mode)  # FSDP2 → DDP
    one = _model()
    one_opt = DolphinFlow(one.parameters(), **CONFIGS[mode])
    ck.load(a, model=one, optimizer=one_opt)  # 2 → 1
    _train(one, one_opt, 2, start=3)
    _close(_full(one), expected, mode)
    seven = _reference(mode, 7)
    _close(run_on_ranks(_run, 2, "fsdp", mode, b, None, 2, 5)[0], seven, mode)  # 4 → 2
