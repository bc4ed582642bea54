"""ShardFlow optimizers under their sharded placements (gloo, CPU): save, reshard, resume.

DolphinFlow on FSDP2 shards (``ShardedPlacement``; uneven, and an empty shard at W=4) and on the
DDP owner plan (``ReplicatedPlacement``; non-owners hold 0-row placeholders): N steps, save, load
at W′ — the same W (bitwise equal to the uninterrupted run), 2→4, 4→2, 2→1 (a plain single
process), and across placements (FSDP2 → owner plan) — then M more steps, equal to N+M steps of
the single-process reference within the sharding tolerance. Also ``torch.distributed.checkpoint``
on FSDP2: the same state keys on every rank, fp32 state and exact counters after a round trip.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist import run_on_ranks

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
    if placement == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        group = mesh
    else:
        group = dist.group.WORLD
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


@pytest.mark.parametrize("mode", ["vector", "matrix"])
def test_fsdp2_resumes_at_2_4_and_1_and_into_the_owner_plan(mode, tmp_path):
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


def test_owner_plan_resumes_at_2_4_and_1(tmp_path):
    mode = "vector"
    a = tmp_path / "a"
    finished = run_on_ranks(_run, 2, "ddp", mode, None, a, 3, 0)
    uninterrupted = run_on_ranks(_run, 2, "ddp", mode, None, None, 5, 0)[0]
    assert run_on_ranks(_run, 2, "ddp", mode, a, None, 2, 3)[0] == uninterrupted
    expected = _reference(mode, 5)
    _close(run_on_ranks(_run, 4, "ddp", mode, a, None, 2, 3)[0], expected, mode)  # 2 → 4
    _close(run_on_ranks(_run, 4, "fsdp", mode, a, None, 2, 3)[0], expected, mode)  # DDP → FSDP2
    index = ck.read_index(a)
    # Owner-only state: every parameter's state comes from its owner, none is lost.
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert len(index["tensors"][f"optim/{name}/exp_avg"]["pieces"]) == 1
    assert finished[0] == finished[1]
    one = _model()
    one_opt = DolphinFlow(one.parameters(), **CONFIGS[mode])
    ck.load(a, model=one, optimizer=one_opt)
    _train(one, one_opt, 2, start=3)
    _close(_full(one), expected, mode)


def _dcp_round_trip(rank, world, path):
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, opt = _placed("fsdp", world, "vector")
    _train(model, opt, 2, rank=rank, world=world)
    for p in model.parameters():
        opt.state[p]["step"].fill_(300.0)
        opt.state[p]["step"] += 1
    osd = get_optimizer_state_dict(model, opt)
    keys = sorted((fqn, k) for fqn, s in osd["state"].items() for k in s)
    dcp.save({"optim": osd}, checkpoint_id=path)

    fresh, fresh_opt = _placed("fsdp", world, "vector")
    fresh.load_state_dict(model.state_dict())
    target = {"optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(target, checkpoint_id=path)
    set_optimizer_state_dict(fresh, fresh_opt, target["optim"])
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key, value in opt.state[p].items():
            got = fresh_opt.state[q][key]
            local = got.to_local() if hasattr(got, "to_local") else got
            want = value.to_local() if hasattr(value, "to_local") else value
            assert local.dtype == want.dtype and torch.equal(local, want), key
        assert fresh_opt.state[q]["step"].item() == 301.0
    return keys


def test_dcp_round_trip_on_fsdp2_keeps_keys_dtypes_and_counters(tmp_path):
    keys = run_on_ranks(_dcp_round_trip, 2, tmp_path / "dcp")
    assert keys[0] == keys[1]  # the same state keys on every rank (an empty shard included)
