"""Generic tests over the table of optimizers (tests/optim_table.py): the torch.optim contract."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from optim_table import all_records, case_id, cases, skip_reason

CASES = cases()


def _skip(record):
    reason = skip_reason(record)
    if reason:
        pytest.skip(reason)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 7, bias=False)
    ).to(dtype)


def _batch(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 12, generator=g, dtype=dtype), torch.randn(
        16, 7, generator=g, dtype=dtype
    )


def _train(model, opt, steps, seed=1, scheduler=None):
    x, y = _batch(next(model.parameters()).dtype, seed)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_training_reduces_the_loss(case):
    record, config = case
    _skip(record)
    model = _model()
    opt = record.factory(model.parameters(), **config)
    x, y = _batch()
    before = torch.nn.functional.mse_loss(model(x), y).item()
    _train(model, opt, 30)
    after = torch.nn.functional.mse_loss(model(x), y).item()
    assert after < 0.9 * before


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_dict_reload_mid_run_continues_identically(case):
    record, config = case
    _skip(record)
    model = _model()
    opt = record.factory(model.parameters(), **config)
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 4, seed=2)
    expected = _params(model)

    model2 = _model(seed=5)
    model2.load_state_dict(saved_model)
    opt2 = record.factory(model2.parameters(), **config)
    opt2.load_state_dict(saved_opt)
    for i, p in enumerate(model2.parameters()):
        for key, value in opt2.state[p].items():
            ref = saved_opt["state"][i][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == ref.dtype, f"state {key!r} changed dtype on load"
    _train(model2, opt2, 4, seed=2)
    for a, b in zip(expected, _params(model2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lr_scheduler_drives_the_step(case):
    record, config = case
    _skip(record)
    model = _model()
    opt = record.factory(model.parameters(), **config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 2 else 0.0)
    _train(model, opt, 2, scheduler=sched)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    frozen = _params(model)
    _train(model, opt, 2, scheduler=sched)
    for a, b in zip(frozen, _params(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_params_without_grad_are_skipped(case):
    record, config = case
    _skip(record)
    model = _model()
    frozen = model[2].weight
    frozen.requires_grad_(False)
    opt = record.factory(model.parameters(), **config)
    state_before = copy.deepcopy(opt.state[frozen])
    value_before = frozen.detach().clone()
    _train(model, opt, 3)
    torch.testing.assert_close(frozen, value_before, rtol=0, atol=0)
    for key, value in opt.state[frozen].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, state_before[key], rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_foreach_and_loop_agree_in_float64(case):
    record, config = case
    _skip(record)
    if not record.foreach or not record.float64:
        pytest.skip(f"{record.name} has no foreach switch or no float64 path")
    results = []
    for foreach in (False, True):
        model = _model(torch.float64)
        opt = record.factory(model.parameters(), foreach=foreach, **config)
        _train(model, opt, 5)
        results.append(_params(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nonfinite_gradient_skips_the_whole_step(case):
    record, config = case
    _skip(record)
    model = _model()
    opt = record.factory(model.parameters(), **config)
    _train(model, opt, 2)
    params, state = _params(model), copy.deepcopy(opt.state_dict())
    x, y = _batch()
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    model[2].weight.grad[1, 1] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.step()
    assert opt.nonfinite_steps == 2
    assert sum("NaN or inf" in str(w.message) for w in caught) == 1
    for a, b in zip(params, _params(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    after = opt.state_dict()["state"]
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(after[pid][key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "record,config,pattern",
    [(r, c, p) for r in all_records() for c, p in r.invalid],
    ids=lambda v: v.name if hasattr(v, "factory") else None,
)
def test_invalid_input_raises_a_named_error(record, config, pattern):
    _skip(record)
    with pytest.raises(ValueError, match=pattern):
        record.factory(_model().parameters(), **config)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_is_created_eagerly_with_the_same_keys_for_every_param(case):
    record, config = case
    _skip(record)
    model = _model()
    opt = record.factory(model.parameters(), **config)
    assert all(opt.state[p] for p in model.parameters()), "state must exist before the first step"
    keys = {
        tuple(sorted(opt.state_dict()["state"][i])) for i in range(len(list(model.parameters())))
    }
    assert keys
