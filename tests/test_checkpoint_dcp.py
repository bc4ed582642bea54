"""torch.distributed.checkpoint interop: ``get/set_optimizer_state_dict`` with ShardFlow optimizers.

DCP's ``_init_optim_state`` steps an optimizer with zero gradients and ``lr=0`` when its state is
empty; ShardFlow optimizers create state eagerly, so DCP never needs to, and a ``set`` must keep
fp32 state fp32 (torch casts to the param dtype) and step counters exact.
"""

from __future__ import annotations

import copy

import pytest
import torch
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
            assert got.dtype == value.dtype != torch.bfloat16, key  # fp32 (or fp64) kept
            assert torch.equal(got, value), key
        assert fresh_opt.state[q]["step"].item() == steps + 1
    _step(model, opt)
    _step(fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
