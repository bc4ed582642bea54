"""WhiteFlow on one process: the rule against a dense reference, projections, rounding, memory."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

import shardflow.optim.whiteflow as whiteflow_module
from shardflow.ops import backend
from shardflow.ops.precision import (
    bf16_stochastic,
    hash32,
    hash32_int,
    hash32_low16,
    random_bits,
    round_bf16_stochastic,
)
from shardflow.ops.projection import projection
from shardflow.optim.whiteflow import WhiteFlow, beta2_at, second_moment_weight

EPS = 1e-8


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on this shared 2-core machine take ~30 ms with 2 OpenMP threads, 4 µs with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _orthograd_reference(g, w):
    """Row-wise ⊥Grad with the row norm restored, written out directly."""
    out = g.clone()
    for i in range(g.shape[0]):
        gi, wi = g[i], w[i]
        if wi.dot(wi) > 0:
            out[i] = gi - gi.dot(wi) / wi.dot(wi) * wi
            if out[i].norm() > 0:
                out[i] *= gi.norm() / out[i].norm()
    return out


def _reference_run(w0, grads, *, mode, rank, freq, lr, wd, betas=(0.9, 0.999), seed=0, clip=None):
    """WhiteFlow on one float64 matrix, every quantity computed densely from its definition
    (``clip``: the gradient is first scaled to norm ``clip`` when its norm is larger)."""
    w = w0.clone()
    rows, n = w.shape
    r = min(rank, n)
    beta1, beta2 = betas
    m = torch.zeros_like(w)
    v = torch.zeros_like(w) if mode == "dense" else torch.zeros(rows, r, dtype=w.dtype)
    prod_b2 = 1.0
    history = []
    for t, grad in enumerate(grads, start=1):
        if clip is not None:
            grad = grad * min(1.0, clip / (grad.norm().item() + 1e-6))
        g = _orthograd_reference(grad, w)
        b2 = min(beta2, 0.9 + 0.099 * t / 100)
        prod_b2 *= b2
        m = beta1 * m + (1 - beta1) * g
        mhat = m / (1 - beta1**t)
        if mode == "dense":
            v = b2 * v + (1 - b2) * g * g
            adapted = mhat / ((v / (1 - prod_b2)).sqrt() + EPS)
            s = adapted.norm(dim=1) / mhat.norm(dim=1)
        else:
            p = projection(seed, n, r, (t - 1) // freq, torch.float64)
            v = b2 * v + (1 - b2) * (g @ p) ** 2
            mr = mhat @ p
            adapted = mr / ((v / (1 - prod_b2)).sqrt() + EPS)
            s = math.sqrt(n / r) * adapted.norm(dim=1) / mr.norm(dim=1)
        history.append(s)
        w = w * (1 - lr * wd) - lr * s[:, None] * mhat
    return w, history


def _run(opt, param, grads):
    out = []
    for g in grads:
        param.grad = g.clone()
        opt.step()
        out.append(param.detach().clone())
    return out


def _problem(rows=6, n=10, steps=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    grads = [torch.randn(rows, n, generator=gen, dtype=torch.float64) for _ in range(steps)]
    return w0, grads


@pytest.mark.parametrize(
    "mode,rank,clip",
    [("projected", 4, None), ("projected", 64, None), ("dense", 4, None), ("projected", 4, 0.5)],
)
def test_update_equals_its_dense_definition(mode, rank, clip):
    """The clipped case checks the clip factor folded into the raw-gradient read (the gradients'
    norms are ≈ 8, so clipping to 0.5 is active on every step)."""
    w0, grads = _problem()
    expected, _ = _reference_run(
        w0, grads, mode=mode, rank=rank, freq=3, lr=0.05, wd=0.1, clip=clip
    )
    param = torch.nn.Parameter(w0.clone())
    opt = WhiteFlow(
        [param],
        lr=0.05,
        weight_decay=0.1,
        rank=rank,
        proj_update_freq=3,
        second_moment=mode,
        gradient_clipping=clip,
    )
    got = _run(opt, param, grads)[-1]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_projected_scale_estimates_the_dense_scale():
    """At full rank with an orthogonal-ish sketch the two agree well; at low rank, roughly."""
    w0, grads = _problem(rows=8, n=256, steps=4)
    _, dense = _reference_run(w0, grads, mode="dense", rank=256, freq=100, lr=0.0, wd=0.0)
    _, low = _reference_run(w0, grads, mode="projected", rank=64, freq=100, lr=0.0, wd=0.0)
    rel = ((low[-1] - dense[-1]).abs() / dense[-1]).max()
    assert rel < 0.35, f"rank-64 sketch is off by {rel:.2f} (relative)"


def test_first_step_rows_have_unit_rms():
    w0, grads = _problem(rows=5, n=400, steps=1)
    for mode, tol in (("dense", 1e-6), ("projected", 0.15)):
        param = torch.nn.Parameter(w0.clone())
        opt = WhiteFlow(
            [param], lr=1.0, weight_decay=0.0, rank=256, second_moment=mode, gradient_clipping=None
        )
        _run(opt, param, grads)
        rms = (param.detach() - w0).pow(2).mean(dim=1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=tol, atol=0)


def test_second_moment_warmup_and_bias_correction():
    assert beta2_at(0.999, 1) == pytest.approx(0.90099)
    assert beta2_at(0.999, 50) == pytest.approx(0.9495)
    assert beta2_at(0.999, 100) == pytest.approx(0.999)
    assert beta2_at(0.999, 1000) == 0.999
    assert beta2_at(0.95, 10) == pytest.approx(0.9099)
    assert beta2_at(0.95, 60) == 0.95
    assert beta2_at(0.8, 1) == 0.8
    for t in (1, 2, 57, 100, 101, 350):
        prod = math.prod(beta2_at(0.999, s) for s in range(1, t + 1))
        assert second_moment_weight(0.999, t) == pytest.approx(1 - prod, rel=1e-12)
    # A constant gradient is estimated exactly from step 1: v̂ = g².
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = WhiteFlow([param], lr=0.0, weight_decay=0.0, gradient_clipping=None)
    for _ in range(5):
        param.grad = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
        opt.step()
    v = opt.state[param]["exp_avg_sq"] / second_moment_weight(0.999, 5)
    torch.testing.assert_close(v, param.grad**2, rtol=1e-12, atol=0)


def test_elementwise_fallback_is_adam_with_warmed_up_beta2():
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(9, dtype=torch.float64, generator=gen)
    grads = [torch.randn(9, dtype=torch.float64, generator=gen) for _ in range(4)]
    w, m, v = w0.clone(), torch.zeros(9, dtype=torch.float64), torch.zeros(9, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * g
        v = beta2_at(0.999, t) * v + (1 - beta2_at(0.999, t)) * g * g
        u = (m / (1 - 0.9**t)) / ((v / second_moment_weight(0.999, t)).sqrt() + EPS)
        w = w * (1 - 0.1 * 0.01) - 0.1 * u
    param = torch.nn.Parameter(w0.clone())
    opt = WhiteFlow([param], lr=0.1, weight_decay=0.01, gradient_clipping=None)
    torch.testing.assert_close(_run(opt, param, grads)[-1], w, rtol=1e-12, atol=1e-12)


def test_embeddings_and_heads_use_the_fallback_by_name():
    model = torch.nn.ModuleDict(
        {"embed_tokens": torch.nn.Embedding(11, 8), "proj": torch.nn.Linear(8, 8)}
    )
    opt = WhiteFlow(model.named_parameters(), rank=4)
    state = opt.state
    assert "exp_avg_sq" in state[model["embed_tokens"].weight]
    assert "exp_avg_sq_proj" in state[model["proj"].weight]
    assert state[model["proj"].weight]["exp_avg_sq_proj"].shape == (8, 4)
    assert "exp_avg_sq" in state[model["proj"].bias]


# -- projections ----------------------------------------------------------------------------


def test_projection_is_regenerated_from_its_key():
    a = projection(7, 96, 16, 3)
    torch.testing.assert_close(a, projection(7, 96, 16, 3), rtol=0, atol=0)
    for other in (projection(8, 96, 16, 3), projection(7, 96, 16, 4)):
        assert not torch.equal(a, other)
    big = projection(0, 512, 256, 0, torch.float64)
    assert abs(big.var().item() - 1 / 256) < 0.02 / 256
    x = torch.randn(512, dtype=torch.float64)
    assert abs((x @ big).norm() / x.norm() - 1) < 0.15


def test_checkpoint_carries_the_seed_not_the_projection():
    w0, grads = _problem(rows=6, n=40, steps=5)
    param = torch.nn.Parameter(w0.clone().float())
    opt = WhiteFlow([param], rank=8, proj_update_freq=2, seed=11)
    _run(opt, param, [g.float() for g in grads[:3]])
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["seed"] == 11
    shapes = {tuple(v.shape) for v in saved["state"][0].values()}
    assert (40, 8) not in shapes and opt.projection_bytes() == 40 * 8 * 4
    expected = _run(opt, param, [g.float() for g in grads[3:]])[-1]

    param2 = torch.nn.Parameter(_after_three(w0, grads))
    opt2 = WhiteFlow([param2], rank=8, proj_update_freq=2, seed=0)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["seed"] == 11
    torch.testing.assert_close(
        _run(opt2, param2, [g.float() for g in grads[3:]])[-1], expected, rtol=0, atol=0
    )


def _after_three(w0, grads):
    param = torch.nn.Parameter(w0.clone().float())
    opt = WhiteFlow([param], rank=8, proj_update_freq=2, seed=11)
    return _run(opt, param, [g.float() for g in grads[:3]])[-1]


def test_projection_cache_keeps_one_refresh_and_lives_where_asked():
    for device in ("param", "cpu"):
        param = torch.nn.Parameter(torch.randn(4, 24))
        opt = WhiteFlow([param], rank=8, proj_update_freq=2, projection_device=device)
        for step in range(1, 6):
            param.grad = torch.randn(4, 24)
            opt.step()
            held = opt.projections.tensors()
            assert len(held) == 1
            torch.testing.assert_close(held[0], projection(0, 24, 8, (step - 1) // 2))
            assert held[0].device.type == "cpu"
            if device == "cpu":
                assert held[0].is_pinned() == torch.cuda.is_available()


def test_projections_are_shared_by_width():
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 5), torch.nn.Linear(16, 7), torch.nn.Linear(5, 3)
    )
    opt = WhiteFlow(model.parameters(), rank=4)
    for layer in model:
        layer.weight.grad = torch.randn_like(layer.weight)
    opt.step()
    assert sorted(p.shape for p in opt.projections.tensors()) == [(5, 4), (16, 4)]


def test_bad_projection_settings_name_the_fix():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match=r"rank=0 is invalid: pass an integer >= 1"):
        WhiteFlow(p, rank=0)
    with pytest.raises(ValueError, match=r"rank=2\.5 is invalid"):
        WhiteFlow(p, rank=2.5)
    with pytest.raises(ValueError, match=r"proj_update_freq=0 is invalid: pass a positive integer"):
        WhiteFlow(p, proj_update_freq=0)
    with pytest.raises(ValueError, match=r"projection_device='cuda:0' is invalid: choose one of"):
        WhiteFlow(p, projection_device="cuda:0")
    with pytest.raises(ValueError, match=r"norm_growth_limit=1 is invalid: pass a number > 1"):
        WhiteFlow(p, norm_growth_limit=1)
    with pytest.raises(ValueError, match=r"compiled='yes' is invalid: pass True, False or None"):
        WhiteFlow(p, compiled="yes")


def test_compiled_defaults_to_cuda_only(monkeypatch):
    """compiled=None on CPU tensors runs eagerly; compiled=True sends the chunk to each."""
    calls = []

    def fake_each(fn, *lists, **kwargs):
        calls.append((fn, len(lists[0]), kwargs))
        return [None] * len(lists[0])

    monkeypatch.setattr(whiteflow_module, "each", fake_each)
    for compiled in (None, True):
        params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5, 4))]
        opt = WhiteFlow(params, rank=2, compiled=compiled)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt.compiled is True
    assert calls == [
        (whiteflow_module.whiteflow_scales_each, 2, {"route": "projected"}),
        (whiteflow_module.whiteflow_apply_each, 2, {}),
    ]


@pytest.mark.skipif(
    os.environ.get("SHARDFLOW_TEST_COMPILE") != "1",
    reason="torch.compile on a CPU takes 1-3 minutes here; set SHARDFLOW_TEST_COMPILE=1",
)
@pytest.mark.parametrize("mode", ["projected", "dense"])
def test_compiled_equals_eager(mode):
    """One fused kernel gives the eager result up to the order of fp32 arithmetic (inductor
    reorders it): a few ulps, except where that flips a bf16 rounding of a state element (same
    random bits, input a few ulps off), which moves one state element by ≤ 1 bf16 ulp (2⁻⁷
    relative) and that row's weights by ≤ lr·2⁻⁸ per remaining step. Measured after 4 steps:
    projected 3e-8, dense 2.8e-7 (9 of 3072 weights above 1e-7)."""
    shapes = {"l1.weight": (64, 48), "l2.weight": (32, 64), "norm.weight": (64,)}
    runs = []
    for name in ("eager", "compiled"):  # the torch passes as written, then compiled
        torch.manual_seed(0)
        named = [(n, torch.nn.Parameter(torch.randn(s) * 0.1)) for n, s in shapes.items()]
        opt = WhiteFlow(named, rank=16, second_moment=mode, compiled=name == "compiled")
        gen = torch.Generator().manual_seed(1)
        with backend.forced(name):
            for _ in range(4):
                for _, p in named:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
        runs.append((named, opt))
    (eager, opt_e), (fused, opt_c) = runs
    for (_, a), (_, b) in zip(eager, fused):
        torch.testing.assert_close(b, a, rtol=0, atol=4 * 1e-3 * 2**-8)
        m_c, m_e = opt_c.state[b]["exp_avg"].float(), opt_e.state[a]["exp_avg"].float()
        torch.testing.assert_close(m_c, m_e, rtol=2**-7, atol=0)
        assert (m_c != m_e).float().mean() < 0.01  # flips are rare, not systematic


# -- stochastic rounding --------------------------------------------------------------------


def _rounded_by_definition(x, seed, offset):
    """The int64 stream of precision.random_bits, its low 16 bits added and truncated."""
    noise = (random_bits(x.numel(), seed, offset, x.device) & 0xFFFF).to(torch.int32)
    bits = (x.contiguous().view(torch.int32) + noise.reshape(x.shape)) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


def test_rounding_is_the_counter_based_stream_bit_for_bit():
    """The int32 in-kernel rounding (tensor key and offset) draws precision's stream exactly."""
    x = torch.randn(300, 70) * 1e-3
    for seed, offset in ((7, 0), (123456789, 5_000), (2**32 - 1, 2**31)):
        key = torch.tensor(hash32_int(seed), dtype=torch.int64)
        ref = _rounded_by_definition(x, seed, offset)
        got = bf16_stochastic(x, key, torch.tensor(offset))
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        torch.testing.assert_close(round_bf16_stochastic(x, seed, offset), ref, rtol=0, atol=0)


def test_rounding_is_unbiased_and_does_not_depend_on_the_shard():
    x = torch.full((2000, 100), 1.0 + 2**-9)  # a quarter of a bf16 ulp above 1
    key = torch.tensor(hash32_int(11))
    full = bf16_stochastic(x, key, torch.tensor(0))
    assert set(full.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(full.double().mean().item() - x[0, 0].item()) < 2e-5
    for start, stop in ((0, 250), (997, 1000), (123, 937), (400, 400)):
        part = bf16_stochastic(x[start:stop], key, torch.tensor(start * 100))
        torch.testing.assert_close(part, full[start:stop], rtol=0, atol=0)


def test_bf16_momentum_tracks_the_fp32_reference():
    """Over many small steps, SR keeps the bf16 momentum unbiased; nearest rounding stalls."""
    g = torch.full((4, 64), 1e-3) * (1 + torch.arange(64) / 64)
    results = {}
    for sr in (True, False):
        param = torch.nn.Parameter(torch.zeros(4, 64))
        opt = WhiteFlow(
            [param], lr=0.0, betas=(0.999, 0.999), stochastic_rounding=sr, gradient_clipping=None
        )
        exact = torch.zeros(4, 64)
        for _ in range(300):
            param.grad = g.clone()
            opt.step()
            exact.mul_(0.999).add_(g, alpha=0.001)
        results[sr] = (opt.state[param]["exp_avg"].float() / exact - 1).abs().mean().item()
    assert results[True] < 0.02 < results[False], results


# -- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,mode", [((6, 12), "dense"), ((6, 12), "projected"), ((12,), "dense")]
)
def test_norm_growth_limiter_caps_growth_at_gamma(shape, mode):
    """Channel-scaled matrices (‖u‖ from the first pass) and an element-wise vector alike."""
    # eps = 1 makes u ≈ M̂ for tiny gradients, so doubling gradients double ‖u‖ unless limited.
    w0 = torch.randn(shape, dtype=torch.float64)
    direction = torch.randn(shape, dtype=torch.float64)
    moves = {}
    for gamma in (None, 1.01):
        param = torch.nn.Parameter(w0.clone())
        opt = WhiteFlow(
            [param],
            lr=0.1,
            eps=1.0,
            norm_growth_limit=gamma,
            gradient_clipping=None,
            weight_decay=0.0,
            second_moment=mode,
            rank=4,
        )
        norms, before = [], w0.clone()
        for k in range(6):
            param.grad = direction * 1e-4 * 2**k
            opt.step()
            norms.append((param.detach() - before).norm().item() / 0.1)
            before = param.detach().clone()
        moves[gamma] = norms
        if gamma is not None:
            # The previous norm is kept as a 0-d fp32 state: agreement to fp32 precision.
            assert float(opt.state[param]["update_norm"]) == pytest.approx(norms[-1], rel=1e-6)
    assert moves[None][-1] > 5 * moves[None][0]  # the unlimited update does grow
    limited = moves[1.01]
    assert limited[0] == pytest.approx(moves[None][0], rel=1e-12)
    for k, norm in enumerate(limited):
        assert norm == pytest.approx(limited[0] * 1.01**k, rel=1e-6)


def test_shape_lr_scaling_uses_two_over_rows_plus_cols():
    w0, grads = _problem(rows=6, n=10, steps=1)
    moves = {}
    for flag in (False, True):
        param = torch.nn.Parameter(w0.clone())
        lr = 1.0 if flag else 2 / 16
        opt = WhiteFlow(
            [param], lr=lr, shape_lr_scaling=flag, weight_decay=0.0, second_moment="dense"
        )
        moves[flag] = _run(opt, param, grads)[-1] - w0
    torch.testing.assert_close(moves[True], moves[False], rtol=1e-12, atol=1e-14)


def test_non_contiguous_parameter_of_three_dims_updates_in_place():
    """A (4, 3, 5) parameter viewed from a permuted buffer cannot be viewed as (4, 15) rows: the
    rule runs on contiguous copies and writes weights, momentum and second moment back."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)
    grads = [torch.randn(4, 3, 5, dtype=torch.float64, generator=gen) for _ in range(3)]
    runs = []
    for contiguous in (True, False):
        w = base.permute(1, 0, 2)
        param = torch.nn.Parameter(
            w.contiguous() if contiguous else w.clone(memory_format=torch.preserve_format)
        )
        assert param.is_contiguous() == contiguous
        opt = WhiteFlow([param], rank=4, gradient_clipping=None)
        moved = _run(opt, param, grads)[-1]
        runs.append((moved, opt.state[param]["exp_avg"].clone()))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-12, atol=1e-14)
    assert not torch.equal(runs[0][0], base.permute(1, 0, 2))


# -- memory ---------------------------------------------------------------------------------


def test_state_bytes_match_the_layout():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 48, bias=False))
    params = 64 * 32 + 32 + 32 * 48
    proj = WhiteFlow(model.parameters(), rank=16)
    # momentum 2 B everywhere; bias: dense v 2 B; matrices: v_R of rows × min(16, cols), 2 B.
    expected = 2 * params + 2 * 32 + 2 * (32 * 16 + 48 * 16)
    assert proj.state_bytes() == expected
    assert proj.state_bytes_per_param() == pytest.approx(expected / params)
    dense = WhiteFlow(model.parameters(), second_moment="dense")
    assert dense.state_bytes_per_param() == 4.0
    capped = WhiteFlow(model.parameters(), rank=1000)
    assert capped.state_dict()["state"][0]["exp_avg_sq_proj"].shape == (32, 64)


def test_int32_hash_equals_precision_hash32():
    x = torch.cat(
        [
            torch.randint(0, 2**32, (100_000,), dtype=torch.int64),
            torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1]),
        ]
    )
    torch.testing.assert_close(hash32_low16(x).long(), hash32(x) & 0xFFFF, rtol=0, atol=0)
