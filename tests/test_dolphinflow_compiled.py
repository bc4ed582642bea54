"""DolphinFlow's fused pass: compiled (``torch.compile``) and eager give the same step.

Compiling takes ~5-15 s per graph on the shared 2-core CPU (eight for the default configuration:
the update with and without the ⊥Grad fold and the ⊥Grad row sums, for each list length the
model's lists are cut into), so the default configuration's compile test runs on every run and the
others only when ``SHARDFLOW_TEST_COMPILE=1`` is set; the eager fused pass is checked against the
step-by-step path (float64) on every run.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch import nn

from shardflow.optim import dolphinflow
from shardflow.optim.dolphinflow import DolphinFlow, dolphinflow_rule, sq_norms_each


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """11 matrices on the vector route (the embedding is named "0.weight") and 12 1-D params:
    the compiled pass cuts the lists into calls of 8 + 3 and 8 + 4 parameters."""
    torch.manual_seed(0)
    widths = [8, 12, 10, 9, 11, 8, 7, 10, 9, 8, 6]
    linears = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    model = nn.Sequential(nn.Embedding(16, 8), *linears, nn.LayerNorm(6), nn.LayerNorm(6))
    return model.to(dtype)


def _train(model: nn.Module, steps: int = 4, **config) -> list[torch.Tensor]:
    opt = DolphinFlow(model.named_parameters(), lr=1e-2, **config)
    gen = torch.Generator().manual_seed(1)
    for k in range(steps):
        for p in model.parameters():  # step 1 is clipped, the others are not
            grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (1e-2 if k else 1.0)
            p.grad = grad.to(p.dtype)
        before = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), before):  # the user's gradients are never written
            assert torch.equal(p.grad, g)
    return [p.detach().clone() for p in model.parameters()] + [
        t.clone() for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"])
    ]


# torch.compile costs 10-30 s per variant on a 2-core CPU: the default variant always runs (it is
# the fast path), the others with SHARDFLOW_TEST_COMPILE=1.
_MORE = pytest.mark.skipif(
    os.environ.get("SHARDFLOW_TEST_COMPILE") != "1",
    reason="torch.compile takes 10-30 s per variant on this CPU: set SHARDFLOW_TEST_COMPILE=1",
)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"ortho_mode": "matrix"},  # the compiled direction before Newton-Schulz
        pytest.param({"vector_mode": "flat", "nesterov": False}, marks=_MORE),
        pytest.param({"dynamic_momentum": True}, marks=_MORE),
    ],
)
def test_compiled_and_eager_steps_agree_in_float32(config, monkeypatch):
    # the embedding (128 elements) takes the compiled norm pass, the 1-D params the base's
    monkeypatch.setattr(dolphinflow, "LARGE", 64)
    # eps=1e-30: with this draw one element of g⊥ cancels to ~1e-8, where the default eps makes
    # g/(|g| + eps) amplify the two paths' different rounding of g⊥ (~4e-10) a million-fold; a
    # negligible eps keeps the update a smooth function of g away from 0.
    compiled = _train(_model(), compiled=True, eps=1e-30, **config)
    eager = _train(_model(), compiled=False, eps=1e-30, **config)
    # fp32, 4 steps: the generated loop orders and vectorizes the same arithmetic differently
    # (≈1 ulp per op); weights are O(1) and move by ~lr = 1e-2 per step, so a formula slip
    # shows at ≥1e-4 while rounding stays below 1e-6.
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["vector", None])
@pytest.mark.parametrize("nesterov", [True, False])
def test_fused_pass_matches_the_stepwise_path_in_float64(mode, nesterov):
    # trust_region=inf forces the step-by-step path without changing the rule
    fused = _train(_model(torch.float64), ortho_mode=mode, nesterov=nesterov, compiled=False)
    stepwise = _train(
        _model(torch.float64), ortho_mode=mode, nesterov=nesterov, trust_region=float("inf")
    )
    for a, b in zip(fused, stepwise):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("fold", [True, False])
def test_the_reference_rule_is_the_written_out_rule(fold):
    gen = torch.Generator().manual_seed(2)
    w, g, m, v = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(4))
    v = v.abs()
    a = torch.rand(3, 1, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(3, 1, generator=gen, dtype=torch.float64)
    decay, mu, beta2, scale, eps, clip = 0.99, 0.9, 0.95, 1e-2, 1e-8, 0.25
    s = torch.tensor([decay, 1 - mu, mu, beta2, 1 - beta2, scale, eps, clip], dtype=torch.float64)
    # with ⊥Grad folded the caller has put the clip factor into a and b; without, s carries it
    gp = a * g - b * w if fold else clip * g
    v_ref = beta2 * v + (1 - beta2) * gp**2
    m_ref = mu * m + (1 - mu) * gp
    n = mu * m_ref + (1 - mu) * gp
    w_ref = w * decay - scale * n / (v_ref.sqrt() + eps)
    dolphinflow_rule(w, g, m, v, s, *((a, b) if fold else (None, None)), nesterov=True)
    for got, ref in ((w, w_ref), (m, m_ref), (v, v_ref)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_compiled_must_be_a_bool_or_none():
    with pytest.raises(ValueError, match=r"compiled='yes' is invalid.*True, False or None"):
        DolphinFlow(_model().parameters(), compiled="yes")


def test_compiled_pass_updates_a_non_contiguous_parameter_in_place():
    # a transposed weight: the pass cannot flatten it, so it runs on the tensors as they are
    # (⊥Grad applied to a copy of the gradient first); weights must move exactly as eager's
    def train(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(6, 9).t())
        opt = DolphinFlow([w], lr=1e-2, compiled=compiled, eps=1e-30)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            w.grad = torch.randn(9, 6, generator=gen)
            opt.step()
        return [w.detach().clone(), opt.state[w]["exp_avg"].clone()]

    for c, e in zip(train(True), train(False)):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 13, 64])
def test_sq_norms_each_is_the_sum_of_squares(n):
    g = torch.arange(1.0, n + 1, dtype=torch.float64)  # every remainder of n mod 4
    (got,) = sq_norms_each([g])
    assert got.item() == sum(k * k for k in range(1, n + 1))


def test_dynamo_settings_are_entered_only_when_the_step_may_compile(monkeypatch):
    import shardflow.optim.base as base  # noqa: PLC0415

    entered = []

    def settings():
        entered.append(True)
        return contextlib.nullcontext()

    monkeypatch.setattr(base, "compile_settings", settings)
    for compiled, expected in ((None, []), (False, []), (True, [True])):
        entered.clear()
        param = nn.Parameter(torch.randn(4, 4))
        param.grad = torch.randn(4, 4)
        opt = DolphinFlow([param], compiled=compiled)
        monkeypatch.setattr(opt, "_step", lambda loss: None)  # the settings, not the step
        opt.step()
        assert entered == expected, compiled
