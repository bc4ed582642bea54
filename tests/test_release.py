"""Gradient release (shardflow/optim/release.py) on one process, over the optimizer table."""

from __future__ import annotations

import pytest
import torch
from optim_table import case_id, cases, skip_reason

import shardflow
from shardflow import prepare_for_gradient_release, remove_gradient_release

CASES = cases()


def _skip(record):
    reason = skip_reason(record)
    if reason:
        pytest.skip(reason)


def _model(seed=0, depth=2):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(12, 20), torch.nn.Tanh()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(20, 20), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(20, 7, bias=False))


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 12, generator=g), torch.randn(16, 7, generator=g)


def _loss(model, step):
    x, y = _batch(step)
    return torch.nn.functional.mse_loss(model(x), y)


def _train(model, opt, steps, *, scheduler=None):
    for step in range(steps):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _states(opt):
    return [
        {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        for g in opt.param_groups
        for p in g["params"]
    ]


def _assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _run(record, config, *, release, steps=5, **prepare):
    model = _model()
    opt = record.factory(model.parameters(), **config)
    if release:
        prepare_for_gradient_release(model, opt, **prepare)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    _train(model, opt, steps, scheduler=sched)
    return model, opt


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_release_equals_the_ordinary_step(case):
    """One bucket per parameter, no clipping: every rule updates a parameter from its own
    gradient and state, so release applies the same operations — bit for bit."""
    record, config = case
    _skip(record)
    config = {**config, "gradient_clipping": None}
    plain, plain_opt = _run(record, config, release=False)
    released, opt = _run(record, config, release=True)
    _assert_same(_params(plain), _params(released))
    _assert_same(
        [v for s in _states(plain_opt) for v in s.values()],
        [v for s in _states(opt) for v in s.values()],
    )
    assert opt.release.released_buckets == 5 * len(list(released.parameters()))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_bucket_with_bucket_clipping_is_global_clipping(case):
    record, config = case
    _skip(record)
    config = {**config, "gradient_clipping": 0.05}  # below the gradient norm: it clips
    plain, plain_opt = _run(record, config, release=False)
    model = _model()
    opt = record.factory(model.parameters(), **config)
    prepare_for_gradient_release(model, opt, buckets=[list(model.parameters())], clipping="bucket")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    _train(model, opt, 5, scheduler=sched)
    _assert_same(_params(plain), _params(model))
    assert opt.last_grad_norm == pytest.approx(plain_opt.last_grad_norm, rel=1e-6)
    assert plain_opt.last_grad_norm > 0.05


def test_constructor_flag_equals_prepare_and_remove_restores_the_ordinary_step():
    record_cfg = dict(lr=1e-2, gradient_clipping=None)
    a = _model()
    opt_a = shardflow.DolphinFlow(a.parameters(), gradient_release=True, **record_cfg)
    assert opt_a.release is not None
    _train(a, opt_a, 3)
    b = _model()
    opt_b = shardflow.DolphinFlow(b.parameters(), **record_cfg)
    prepare_for_gradient_release(b, opt_b)
    _train(b, opt_b, 3)
    _assert_same(_params(a), _params(b))
    remove_gradient_release(b)
    assert opt_b.release is None
    _loss(b, 0).backward()
    assert all(p.grad is not None for p in b.parameters())  # no hook frees them now
    with pytest.raises(ValueError, match="no gradient release to remove"):
        remove_gradient_release(b)


def _peak_live_grad_bytes(model, opt, steps=2):
    """The most gradient bytes alive at any post-accumulate-grad hook (registered first, so it
    sees each gradient before release frees it)."""
    params = list(model.parameters())
    peak = [0]

    def count(_):
        live = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        peak[0] = max(peak[0], live)

    handles = [p.register_post_accumulate_grad_hook(count) for p in params]
    if opt is not None and opt.release is not None:  # re-attach: release's hooks run after
        prepare_for_gradient_release(model, opt)
    _train(model, opt, steps)
    for h in handles:
        h.remove()
    return peak[0]


def test_gradients_are_freed_as_they_are_applied():
    model = _model(depth=6)
    opt = shardflow.DolphinFlow(model.parameters(), lr=1e-2, gradient_release=True)
    released = _peak_live_grad_bytes(model, opt)
    assert all(p.grad is None for p in model.parameters())
    assert opt.release.live_grad_bytes() == 0
    model2 = _model(depth=6)
    plain = _peak_live_grad_bytes(model2, shardflow.DolphinFlow(model2.parameters(), lr=1e-2))
    total = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    assert plain == total
    assert released == largest  # one gradient at a time: the one being applied


def test_a_parameter_without_gradient_in_some_steps_and_a_frozen_one():
    def build():
        model = _model(depth=3)
        model[0].bias.requires_grad_(False)  # frozen
        extra = torch.nn.Linear(7, 7)
        return model, extra

    def train(release):
        model, extra = build()
        params = [p for p in [*model.parameters(), *extra.parameters()] if p.requires_grad]
        opt = shardflow.FactoredProdigy(params, d0=1e-3)
        if release:
            prepare_for_gradient_release(model, opt)
        for step in range(6):
            x, y = _batch(step)
            out = model(x)
            if step % 2 == 0:  # extra gets a gradient on even steps only
                out = extra(out)
            torch.nn.functional.mse_loss(out, y).backward()
            opt.step()
            opt.zero_grad()
        return [*_params(model), *_params(extra)], opt

    plain, plain_opt = train(False)
    released, opt = train(True)
    _assert_same(plain, released)
    _assert_same(
        [v for s in _states(plain_opt) for v in s.values()],
        [v for s in _states(opt) for v in s.values()],
    )
    fresh, _ = build()
    torch.testing.assert_close(released[1], fresh[0].bias.detach(), rtol=0, atol=0)


def test_nan_in_one_bucket_skips_that_bucket_only():
    model = _model()
    opt = shardflow.DolphinFlow(model.parameters(), lr=1e-2, gradient_release=True)
    _train(model, opt, 2)
    before_w, before_s = _params(model), _states(opt)
    poisoned = model[0].weight
    handle = poisoned.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        _loss(model, 3).backward()
    opt.step()
    handle.remove()
    after_w, after_s = _params(model), _states(opt)
    index = [p is poisoned for p in model.parameters()].index(True)
    for i, (b, a) in enumerate(zip(before_w, after_w)):
        assert torch.equal(a, b) == (i == index)
    for k in before_s[index]:
        assert torch.equal(before_s[index][k], after_s[index][k])
    assert opt.release.skipped_buckets == 1
    assert opt.nonfinite_steps == 1
    assert not torch.isfinite(torch.tensor(opt.last_grad_norm))


def test_backward_twice_before_step_raises_before_the_state_changes():
    model = _model()
    opt = shardflow.DolphinFlow(model.parameters(), lr=1e-2, gradient_release=True)
    _loss(model, 0).backward()
    weights, states = _params(model), _states(opt)
    with pytest.raises(RuntimeError, match="a second time before optimizer.step"):
        _loss(model, 1).backward()
    _assert_same(weights, _params(model))
    for a, b in zip(states, _states(opt)):
        _assert_same(list(a.values()), list(b.values()))


def test_fp16_parameters_are_refused():
    model = _model().half()
    with pytest.raises(ValueError, match="fp16 parameters is not supported.*bf16"):
        shardflow.DolphinFlow(model.parameters(), gradient_release=True)


def test_bad_release_arguments_name_the_value():
    model = _model()
    opt = shardflow.DolphinFlow(model.parameters())
    with pytest.raises(ValueError, match="clipping='global' is invalid"):
        prepare_for_gradient_release(model, opt, clipping="global")
    with pytest.raises(ValueError, match="buckets=0 is invalid"):
        prepare_for_gradient_release(model, opt, buckets=0)
    with pytest.raises(ValueError, match="each of the optimizer's 3 parameters exactly once"):
        prepare_for_gradient_release(model, opt, buckets=[[model[0].weight]])
    with pytest.raises(ValueError, match="gradient_release='yes' is invalid"):
        shardflow.DolphinFlow(model.parameters(), gradient_release="yes")
    with pytest.raises(ValueError, match="needs a ShardFlow optimizer"):
        prepare_for_gradient_release(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("precision", ["kahan", "sr"])
@pytest.mark.parametrize(
    "factory",
    [
        lambda ps, **kw: shardflow.DolphinFlow(ps, lr=1e-2, ortho_mode="matrix", **kw),
        lambda ps, **kw: shardflow.FactoredAdam(ps, lr=1e-2, **kw),
    ],
    ids=["DolphinFlow-matrix", "FactoredAdam"],
)
def test_bf16_weights_release_equals_the_ordinary_step(factory, precision):
    """bf16 weights reach the rule as fp32 working copies per bucket; Kahan buffers and the
    stochastic-rounding streams (keyed by parameter index and step) are the same."""

    def run(release):
        model = _model().to(torch.bfloat16)
        opt = factory(model.parameters(), precision=precision, gradient_clipping=None)
        if release:
            prepare_for_gradient_release(model, opt)
        for step in range(4):
            x, y = _batch(step)
            torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
            opt.step()
            opt.zero_grad()
        return _params(model)

    _assert_same(run(False), run(True))
