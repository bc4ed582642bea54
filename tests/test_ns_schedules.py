"""Newton-Schulz coefficient schedules (Muon's fixed quintic, Polar Express per iteration) and
⊥Grad on DolphinFlow's Newton-Schulz routes (``ns_orthograd``)."""

from __future__ import annotations

import math

import pytest
import torch

from shardflow import DolphinFlow
from shardflow.ops.orthogonalize import (
    NS_COEFFS,
    POLAR_EXPRESS_COEFFS,
    newton_schulz,
    ns_coefficients,
    orthogonality_error,
    orthograd_,
)


def _power_law(m, n, seed=0):
    """Singular values 1/i on random singular vectors: a gradient-like, nearly low-rank input."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((u / torch.arange(1, k + 1, dtype=torch.float64)) @ v.T).float()


INPUTS = {
    "gaussian-wide": lambda: torch.randn(48, 96, generator=torch.Generator().manual_seed(1)),
    "gaussian-tall": lambda: torch.randn(160, 40, generator=torch.Generator().manual_seed(2)),
    "power-law": lambda: _power_law(64, 128),
}


def test_the_schedules_coefficients():
    assert ns_coefficients("muon", 4) == [NS_COEFFS] * 4
    pe = ns_coefficients("polar_express", 10)
    a, b, c = pe[0]  # the paper's first polynomial over its safety factor 1.01
    assert (a, b, c) == pytest.approx(
        (8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3, 17.300387312530933 / 1.01**5)
    )
    assert pe[7:] == [(1.875, -1.25, 0.375)] * 3 and len(POLAR_EXPRESS_COEFFS) == 8
    a, b, c = pe[-1]  # the limit polynomial fixes 1 with zero slope: p(1) = 1, p'(1) = 0
    assert (a + b + c, a + 3 * b + 5 * c) == (1.0, 0.0)
    with pytest.raises(
        ValueError, match="coeffs='jordan' is invalid: pass one of muon, polar_express"
    ):
        newton_schulz(torch.ones(2, 3), coeffs="jordan")


@pytest.mark.parametrize("name", INPUTS)
def test_polar_express_converges_where_muon_plateaus(name):
    """Same cost per iteration; at 5 iterations Polar Express's singular values lie in
    [0.85, 1.15] (Muon's: [0.6, 1.25]), at 6 its error is below 1e-2; Muon stays near 0.3."""
    x = INPUTS[name]()
    five = newton_schulz(x, min_steps=5, max_steps=5, coeffs="polar_express")
    s = torch.linalg.svdvals(five.double())
    assert s.min() >= 0.85 and s.max() <= 1.15
    six = newton_schulz(x, min_steps=6, max_steps=6, coeffs="polar_express")
    assert orthogonality_error(six) < 1e-2
    muon = newton_schulz(x, min_steps=8, max_steps=8)
    assert orthogonality_error(muon) > 0.25


def test_polar_express_in_bf16_stays_close_to_fp32():
    x = INPUTS["gaussian-wide"]()
    fixed = dict(min_steps=5, max_steps=5, coeffs="polar_express")
    ref = newton_schulz(x, **fixed)
    low = newton_schulz(x, dtype=torch.bfloat16, **fixed)
    assert low.dtype == x.dtype and (low - ref).norm() / ref.norm() < 0.05
    assert orthogonality_error(low) < 0.3


def test_adaptive_polar_express_equals_the_fixed_count_it_stopped_at():
    x = INPUTS["power-law"]()
    adaptive = newton_schulz(x, min_steps=3, max_steps=8, tol=0.05, coeffs="polar_express")
    stops = [
        k
        for k in range(3, 9)
        if orthogonality_error(newton_schulz(x, min_steps=k, max_steps=k, coeffs="polar_express"))
        <= 0.05
    ]
    fixed = newton_schulz(x, min_steps=stops[0], max_steps=stops[0], coeffs="polar_express")
    torch.testing.assert_close(adaptive, fixed)


def _one_step(w0, grads, **kw):
    w = torch.nn.Parameter(w0.clone())
    opt = DolphinFlow([w], gradient_clipping=None, weight_decay=0.0, **kw)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach()


def _data(seed=0, steps=3):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    return w0, [torch.randn(12, 20, generator=gen, dtype=torch.float64) for _ in range(steps)]


def test_ns_coeffs_reach_newton_schulz():
    w0, (g,) = _data(steps=1)
    lr = 1e-2
    got = _one_step(
        w0,
        [g],
        lr=lr,
        ortho_mode="matrix",
        adaptive_lr=False,
        ns_coeffs="polar_express",
        ns_min_steps=5,
        ns_max_steps=5,
    )
    u = newton_schulz(g, min_steps=5, max_steps=5, coeffs="polar_express") * math.sqrt(20)
    torch.testing.assert_close(got, w0 - lr * u)


@pytest.mark.parametrize("mode", ["matrix", "block"])
def test_ns_orthograd_gradient_equals_projecting_each_gradient_first(mode):
    """``"gradient"``: the run equals plain Newton-Schulz fed ⊥Grad-projected gradients (each
    projected against the weight of its step, rescaled to its norm), Adam moments and all."""
    w0, grads = _data()
    kw = dict(lr=1e-2, ortho_mode=mode, block_size=8)
    got = _one_step(w0, grads, ns_orthograd="gradient", **kw)
    w = torch.nn.Parameter(w0.clone())
    opt = DolphinFlow([w], gradient_clipping=None, weight_decay=0.0, **kw)
    for g in grads:
        w.grad = orthograd_(g.clone(), w.detach(), rowwise=True, restore_norm=True)
        opt.step()
    torch.testing.assert_close(got, w.detach())
    assert not torch.allclose(got, _one_step(w0, grads, **kw))


def test_ns_orthograd_direction_projects_what_enters_newton_schulz():
    """``"direction"``, first step without ``adaptive_lr``: the direction is the gradient, so
    the update is ``NS(g⊥)·√max(m, n)``; the Newton-Schulz input has no component along the
    weight (flat: ⟨g⊥, w⟩ = 0)."""
    w0, (g,) = _data(steps=1)
    lr = 1e-2
    kw = dict(lr=lr, ortho_mode="matrix", adaptive_lr=False, ns_min_steps=5, ns_max_steps=5)
    got = _one_step(w0, [g], ns_orthograd="direction", vector_mode="flat", **kw)
    g_perp = orthograd_(g.clone(), w0, rowwise=False, restore_norm=True)
    assert abs(float((g_perp * w0).sum())) < 1e-10
    u = newton_schulz(g_perp, min_steps=5, max_steps=5) * math.sqrt(20)
    torch.testing.assert_close(got, w0 - lr * u)
    assert not torch.allclose(got, _one_step(w0, [g], **kw))


def test_ns_orthograd_leaves_the_vector_and_elementwise_routes_alone():
    w0, grads = _data()
    for mode in ("vector", None):
        kw = dict(lr=1e-2, ortho_mode=mode)
        torch.testing.assert_close(
            _one_step(w0, grads, ns_orthograd="direction", **kw), _one_step(w0, grads, **kw)
        )
