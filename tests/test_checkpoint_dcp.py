"""torch.distributed.checkpoint interop: ``get/set_optimizer_state_dict`` with ShardFlow optimizers.

DCP's ``_init_optim_state`` steps an optimizer with zero gradients and ``lr=0`` when its state is
empty; ShardFlow optimizers create state eagerly, so DCP never needs to, and a ``set`` must keep
fp32 state fp32 (torch casts to the param dtype) and step counters exact.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from dist import run_on_ranks
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from shardflow import DolphinFlow


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Linear(10, 3)).to(torch.bfloat16)


def _step(model, opt):
    opt.zero_grad()
    model(torch.ones(4, 6, dtype=torch.bfloat16)).float().square().mean().backward()
    opt.step()


def test_dcp_does_not_step_an_eager_optimizer():
    model = _model()
    opt = DolphinFlow(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    osd = get_optimizer_state_dict(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(opt.state[p]["step"].item() == 0 for p in model.parameters())
    assert set(osd["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}  # FQN keys


@pytest.mark.parametrize("steps", [1, 300])
def test_dcp_round_trip_keeps_fp32_state_and_exact_counters(steps):
    model = _model()
    opt = DolphinFlow(model.parameters(), lr=1e-2)
    _step(model, opt)
    for p in model.parameters():
        opt.state[p]["step"].fill_(float(steps))  # bf16 would turn 301 into 300
        opt.state[p]["step"] += 1
    osd = copy.deepcopy(get_optimizer_state_dict(model, opt))  # as if read back from storage

    fresh = _model(seed=1)
    fresh.load_state_dict(model.state_dict())
    fresh_opt = DolphinFlow(fresh.parameters(), lr=0.5)
    set_optimizer_state_dict(fresh, fresh_opt, osd)
    assert fresh_opt.param_groups[0]["lr"] == 1e-2
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key, value in opt.state[p].items():
            got = fresh_opt.state[q][key]
            if key == "kahan":  # the compensation is kept in the weight's dtype, by design
                assert got.dtype == value.dtype == q.dtype == torch.bfloat16
            else:
                assert got.dtype == value.dtype != torch.bfloat16, key  # fp32 (or fp64) kept
            assert torch.equal(got, value), key
        assert fresh_opt.state[q]["step"].item() == steps + 1
    _step(model, opt)
    _step(fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


# -- every optimizer in the table, on FSDP2 (2 gloo ranks) ---------------------------------------


def _sharded(record, world):
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    model = model.to(torch.bfloat16)  # torch's own load would cast fp32 state to bf16
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, record.factory(model.parameters(), process_group=mesh, **record.configs[0])


def _sharded_step(model, opt, step, rank, world):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    opt.zero_grad()
    out = model(x[rank::world].to(torch.bfloat16)).float()
    torch.nn.functional.mse_loss(out, y[rank::world]).backward()
    opt.step()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _dcp_table(rank, world, names, root):
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from optim_table import all_records  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        _init_optim_state,
        get_model_state_dict,
        set_model_state_dict,
    )

    records = {r.name: r for r in all_records()}
    keys = {}
    for name in names:
        record = records[name]
        model, opt = _sharded(record, world)
        for step in (1, 2):
            _sharded_step(model, opt, step, rank, world)
        for p in model.parameters():  # a counter bf16 cannot hold (301 rounds to 300)
            opt.state[p]["step"].fill_(300.0)
            opt.state[p]["step"] += 1
        osd = get_optimizer_state_dict(model, opt)
        keys[name] = sorted((fqn, k) for fqn, s in osd["state"].items() for k in s)
        dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=root / name)

        fresh, fresh_opt = _sharded(record, world)
        fresh_opt.param_groups[0]["lr"] = 0.5
        before = [_local(p).clone() for p in fresh.parameters()]
        # DCP's zero-gradient lr=0 initialisation step, run by torch's own code (it skips an
        # optimizer whose state exists, so it is shown the param groups without the state).
        _init_optim_state(
            SimpleNamespace(
                state={},
                param_groups=fresh_opt.param_groups,
                step=fresh_opt.step,
                zero_grad=fresh_opt.zero_grad,
            )
        )
        assert all(torch.equal(a, _local(p)) for a, p in zip(before, fresh.parameters())), name
        for p in fresh.parameters():
            for key, value in fresh_opt.state[p].items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    assert torch.isfinite(_local(value)).all(), (name, key)

        target = {
            "model": get_model_state_dict(fresh),
            "optim": get_optimizer_state_dict(fresh, fresh_opt),
        }
        dcp.load(target, checkpoint_id=root / name)
        set_model_state_dict(fresh, target["model"])
        set_optimizer_state_dict(fresh, fresh_opt, target["optim"])
        assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"], name
        for p, q in zip(model.parameters(), fresh.parameters()):
            assert fresh_opt.state[q].keys() == opt.state[p].keys(), name
            for key, value in opt.state[p].items():
                got = fresh_opt.state[q][key]
                if not isinstance(value, torch.Tensor):
                    assert got == value, (name, key)
                    continue
                assert type(got) is type(value), (name, key)  # DTensor stays DTensor
                assert _local(got).dtype == _local(value).dtype, (name, key)
                assert torch.equal(_local(got), _local(value)), (name, key)
            assert fresh_opt.state[q]["step"].item() == 301.0, name
        _sharded_step(model, opt, 3, rank, world)
        _sharded_step(fresh, fresh_opt, 3, rank, world)
        for a, b in zip(model.parameters(), fresh.parameters()):
            assert torch.equal(_local(a), _local(b)), name
    return keys


def test_every_optimizer_round_trips_through_dcp_on_fsdp2(tmp_path):
    from optim_table import all_records, skip_reason  # noqa: PLC0415

    names = [r.name for r in all_records() if not skip_reason(r)]
    keys = run_on_ranks(_dcp_table, 2, names, tmp_path)
    assert keys[0] == keys[1]  # the same state keys on every rank (uneven shards)
    assert set(keys[0]) == set(names)
