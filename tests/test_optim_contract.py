"""Generic tests over the table of optimizers (tests/optim_table.py): the torch.optim contract."""

from __future__ import annotations

import copy
import math
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


RECORDS = all_records()


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
@pytest.mark.parametrize(
    "config,pattern",
    [
        ({"lr": math.inf}, r"lr=inf is invalid: pass a learning rate >= 0 \(a finite number\)"),
        ({"lr": True}, r"lr=True is invalid: pass a learning rate >= 0"),
        ({"weight_decay": math.inf}, r"weight_decay=inf is invalid: pass a finite number >= 0"),
        ({"gradient_clipping": math.nan}, r"gradient_clipping=nan is invalid"),
    ],
)
def test_infinite_and_boolean_numbers_are_refused(record, config, pattern):
    _skip(record)
    with pytest.raises(ValueError, match=pattern):
        record.factory(_model().parameters(), **{**record.configs[0], **config})


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_complex_parameters_are_refused_at_construction_naming_them(record):
    _skip(record)
    model = _model()
    z = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    named = [*model.named_parameters(), ("rotor", z)]
    with pytest.raises(
        ValueError, match=r"parameter 'rotor' has dtype torch\.complex64 \(complex\)"
    ):
        record.factory(named, **record.configs[0])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_empty_parameters_step(case):
    record, config = case
    _skip(record)
    model = _model()
    empty = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((5, 0), (0, 5), (0,))]
    opt = record.factory([*model.parameters(), *empty], **config)
    for p in empty:
        p.grad = torch.zeros_like(p)
    before = _params(model)
    _train(model, opt, 2)
    assert all(p.shape == e for p, e in zip(empty, ((5, 0), (0, 5), (0,))))
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(model)))


def _other(record):
    """A record of another optimizer class, whose state_dict ``record`` must refuse."""
    target = "DolphinFlow" if record.name == "WhiteFlow" else "WhiteFlow"
    return next(r for r in RECORDS if r.name == target)


def _refused_and_untouched(opt, state_dict, pattern):
    """``load_state_dict`` raises matching ``pattern`` and leaves the state as it was."""
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for pid, entries in before["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after["state"][pid][key], value)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_load_state_dict_refuses_another_optimizers_state(record):
    _skip(record)
    other = _other(record)
    model = _model()
    theirs = other.factory(model.parameters(), **other.configs[0])
    _train(model, theirs, 1)
    opt = record.factory(model.parameters(), **record.configs[0])
    _refused_and_untouched(opt, theirs.state_dict(), r"another optimizer's state")


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_load_state_dict_refuses_state_of_other_shapes(record):
    _skip(record)
    wide = torch.nn.Sequential(
        torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 7, bias=False)
    )
    theirs = record.factory(wide.parameters(), **record.configs[0])
    _train(wide, theirs, 1)
    opt = record.factory(_model().parameters(), **record.configs[0])
    _refused_and_untouched(opt, theirs.state_dict(), r"parameter 0 of param group 0 has shape")


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
@pytest.mark.parametrize(
    "key,value,pattern",
    [("lr", "fast", r"lr='fast' is invalid"), ("weight_decay", -1.0, r"weight_decay=-1\.0")],
)
def test_load_state_dict_checks_hyperparameters_like_the_constructor(record, key, value, pattern):
    _skip(record)
    model = _model()
    opt = record.factory(model.parameters(), **record.configs[0])
    _train(model, opt, 1)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0][key] = value
    _refused_and_untouched(opt, saved, r"param group 0 of the state_dict: " + pattern)
