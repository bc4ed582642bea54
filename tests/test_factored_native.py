"""The native CPU kernel of FactoredAdam (:mod:`shardflow.ops.native.factored`) against the
torch path.

Tolerances. The kernel does the torch path's operations in its order, with fused multiply-adds
exactly where torch's vectorized ``lerp`` and ``addcmul`` use them, so the new signs are
bit-identical and ~90 % of the weights too; the rest differ by one fp32 ulp (the denominator
``√v·den_scale + den_eps`` rounds differently for ~10 % of elements; cause not pinned down).
Hence, for one step from given factors: weights ``rtol=2.5e-7`` (≈2 ulps), ``atol=1e-9``.
Row and column sums are summed in another order than torch's reductions: ``rtol=1e-6``
(a few ulps of a sum of up to a thousand terms). Over several optimizer steps these
differences feed back through the factors: ``rtol=1e-5, atol=1e-6`` (as the compiled path's
test and the AdamW equivalence test). Thread counts: bit-identical (rows are split over
threads on fixed blocks whose column sums are added in block order).
"""

from __future__ import annotations

import pytest
import torch
from dist import run_on_ranks
from native_fallback import check_off_switch_and_failed_build
from test_factored_dist import _from_bytes, _sharded, _single, _to_bytes

from shardflow.ops.native import factored as factored_native
from shardflow.optim.factored import (
    FactoredAdam,
    FactoredAdopt,
    FactoredProdigy,
    StepScalars,
    _normalized,
    adam_direction,
    factored_chunk_update,
    pack_signs,
)

pytestmark = pytest.mark.skipif(
    not factored_native.available(), reason="no native kernel here (needs x86-64 AVX2 and cc)"
)

ODD_SHAPES = [(1, 5), (7, 13), (33, 8), (3, 1000), (600, 3), (1, 1)]
STEPS_TOL = {"rtol": 1e-5, "atol": 1e-6}


def _factors(rows, cols, gen):
    """Stored factors as the optimizer keeps them: ``|m|``'s bf16, ``v``'s fp32, columns not
    normalized."""
    rm, rv = torch.rand(rows, generator=gen).bfloat16(), torch.rand(rows, generator=gen) * 1e-2
    cm, cv = torch.rand(cols, generator=gen).bfloat16() * 3, torch.rand(cols, generator=gen) * 5
    signs = pack_signs(torch.rand(rows, cols, generator=gen) < 0.5)
    return rm, rv, cm, cv, signs


def _torch_step(w, g, rm, rv, cm, cv, signs, s, grad_scale, lr, wd):
    """The torch path's arithmetic (``_Factored._factored_step`` and ``_apply``) on one chunk."""
    u, new_signs, rows, cols = factored_chunk_update(
        adam_direction,
        g * grad_scale,
        {"exp_avg": rm, "exp_avg_sq": rv},
        {"exp_avg": _normalized(cm, torch.float32), "exp_avg_sq": _normalized(cv, torch.float32)},
        {"exp_avg": signs.clone()},
        s,
        atan2=False,
        grams=False,
    )
    w = w.clone().mul_(1.0 - lr * wd).add_(u, alpha=-lr)
    return w, new_signs["exp_avg"], rows, cols


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_kernel_matches_the_torch_path_on_odd_shapes(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    rows, cols = shape
    w, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    rm, rv, cm, cv, signs = _factors(rows, cols, gen)
    s = StepScalars(beta1=0.9, beta2=0.999, eps=1e-8, bc1=1 - 0.9**3, bc2=1 - 0.999**3)
    grad_scale, lr, wd = 0.7, 1e-2, 0.1
    want_w, want_signs, want_rows, want_cols = _torch_step(
        w, g, rm, rv, cm, cv, signs, s, grad_scale, lr, wd
    )
    got_w, got_signs = w.clone(), signs.clone()
    scalars = (grad_scale, 1 - 0.9, 0.999, s.den_scale, s.den_eps, 1 - lr * wd, lr)
    got_rv = rv.clone()
    job = factored_native.Job(got_w, g, (rm, got_rv), (cm, cv), got_signs, scalars)
    ((got_rm, got_cm, got_cv),) = factored_native.adam_many([job])
    got = (got_rm, got_rv, got_cm, got_cv)
    assert torch.equal(got_signs, want_signs)
    torch.testing.assert_close(got_w, want_w, rtol=2.5e-7, atol=1e-9)
    assert not torch.equal(got_w, w)
    torch.testing.assert_close(got[0], want_rows["exp_avg"], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], want_rows["exp_avg_sq"], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[2], want_cols["exp_avg"], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[3], want_cols["exp_avg_sq"], rtol=1e-6, atol=0)


def test_thread_counts_give_identical_results():
    gen = torch.Generator().manual_seed(0)
    shapes = [(301, 259), (40, 24), (1, 5), (97, 8)]  # > 2¹⁶ elements: the threads really split
    inputs = [(torch.randn(s, generator=gen), torch.randn(s, generator=gen)) for s in shapes]
    factors = [_factors(*s, gen) for s in shapes]
    scalars = (1.0, 0.1, 0.999, 0.5, 1e-8, 0.999, 1e-2)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            jobs = [
                factored_native.Job(
                    w.clone(), g, (f[0], f[1].clone()), f[2:4], f[4].clone(), scalars
                )
                for (w, g), f in zip(inputs, factors)
            ]
            out = factored_native.adam_many(jobs)
            results.append(
                [t for j, o in zip(jobs, out) for t in (j.w, j.signs, j.row_factors[1], *o)]
            )
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_many_matrices_in_one_call_equal_one_call_each():
    """The group's call is the per-matrix call: a matrix's result does not depend on the others."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(64, 40), (7, 13), (300, 250)]
    inputs = [(torch.randn(s, generator=gen), torch.randn(s, generator=gen)) for s in shapes]
    factors = [_factors(*s, gen) for s in shapes]
    scalars = (0.5, 0.1, 0.99, 0.7, 1e-8, 1.0, 3e-3)

    def jobs():
        return [
            factored_native.Job(w.clone(), g, (f[0], f[1].clone()), f[2:4], f[4].clone(), scalars)
            for (w, g), f in zip(inputs, factors)
        ]

    together = jobs()
    out = factored_native.adam_many(together)
    for i, job in enumerate(jobs()):
        (alone,) = factored_native.adam_many([job])
        for a, b in zip(
            (job.w, job.signs, job.row_factors[1], *alone),
            (together[i].w, together[i].signs, together[i].row_factors[1], *out[i]),
        ):
            assert torch.equal(a, b)


def _train(cls, shapes, dtype, steps, native, monkeypatch, **hyper):
    """``steps`` steps with the kernel on or off; returns (weights, optimizer, matrices the kernel
    stepped)."""
    calls = []
    kernel = factored_native.adam_many
    monkeypatch.setattr(
        factored_native, "adam_many", lambda jobs: calls.extend(jobs) or kernel(jobs)
    )
    monkeypatch.setattr(factored_native, "usable", _usable if native else lambda *a: False)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = cls(params, **hyper)
    grads = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads).to(dtype)
        opt.step()
    monkeypatch.undo()
    return params, opt, len(calls)


_usable = factored_native.usable


def test_optimizer_with_the_kernel_equals_the_torch_path(monkeypatch):
    """Several steps with weight decay and clipping (grad_scale ≠ 1), odd and 4-D shapes: the
    weights and every state match; the checkpoint holds the same keys, dtypes and shapes."""
    shapes = [(7, 13), (1, 9), (8, 3, 3, 3), (40, 16), (5,)]
    hyper = {"lr": 1e-2, "weight_decay": 0.1, "gradient_clipping": 1.0}
    native, opt_n, calls = _train(
        FactoredAdam, shapes, torch.float32, 4, True, monkeypatch, **hyper
    )
    eager, opt_e, none = _train(FactoredAdam, shapes, torch.float32, 4, False, monkeypatch, **hyper)
    assert calls == 4 * 4 and none == 0
    for a, b in zip(native, eager):
        torch.testing.assert_close(a, b, **STEPS_TOL)
    sd_n, sd_e = opt_n.state_dict()["state"], opt_e.state_dict()["state"]
    for i in sd_e:
        assert sd_n[i].keys() == sd_e[i].keys()
        for k, t in sd_e[i].items():
            got = sd_n[i][k]
            assert got.dtype == t.dtype and got.shape == t.shape, k
            if k.endswith("_sign"):
                assert (got != t).float().mean() < 0.01, k  # a sign flips only near zero
            elif t.dtype == torch.bfloat16:  # stochastic rounding: a near tie may round apart
                torch.testing.assert_close(got.float(), t.float(), rtol=2**-7, atol=0)
            else:
                torch.testing.assert_close(got, t, **STEPS_TOL)


@pytest.mark.parametrize(
    ("cls", "dtype", "hyper"),
    [
        (FactoredAdam, torch.float64, {}),
        (FactoredAdam, torch.bfloat16, {}),
        (FactoredAdam, torch.float32, {"ademamix": True}),
        (FactoredAdam, torch.float32, {"atan2": True}),
        (FactoredAdam, torch.float32, {"grams": True}),
        (FactoredAdopt, torch.float32, {}),
        (FactoredProdigy, torch.float32, {}),
    ],
)
def test_other_dtypes_and_rules_take_the_torch_path(monkeypatch, cls, dtype, hyper):
    _, _, calls = _train(cls, [(7, 13)], dtype, 2, True, monkeypatch, **hyper)
    assert calls == 0


def test_off_switch_and_a_failed_build_fall_back_to_torch(monkeypatch, tmp_path):
    def step():
        w = torch.nn.Parameter(torch.randn(4, 9))
        opt = FactoredAdam([w], lr=1e-2)
        w.grad = torch.randn(4, 9)
        before = w.detach().clone()
        opt.step()
        assert not torch.equal(w.detach(), before)

    check_off_switch_and_failed_build(monkeypatch, tmp_path, factored_native._library, step)


CASES = [{"lr": 0.05, "weight_decay": 0.1}, {"lr": 0.05, "orthograd": True}]


def _ranks_fp32(rank, world, mode):
    calls = []
    kernel = factored_native.adam_many
    factored_native.adam_many = lambda jobs: calls.extend(jobs) or kernel(jobs)
    got = [_sharded(mode, "adam", h, torch.float32, 4, rank, world) for h in CASES]
    sharded_calls = len(calls)
    want = [_single("adam", h, torch.float32, 4)[0] for h in CASES] if rank == 0 else None
    return _to_bytes((got, want, sharded_calls))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_kernel_on_ranks_gives_the_single_process_result(mode, world):
    """fp32 FactoredAdam through the kernel on 2 and 4 gloo ranks equals one process (the column
    sums of differently split rows agree to fp32 rounding)."""
    results = [_from_bytes(r) for r in run_on_ranks(_ranks_fp32, world, mode, timeout=60)]
    want = results[0][1]
    assert sum(r[2] for r in results) > 0
    for got_cases, _, _ in results:
        for got, expected in zip(got_cases, want):
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b.detach(), **STEPS_TOL)


def test_non_contiguous_state_takes_the_torch_path(monkeypatch):
    """The kernel reads the state through raw pointers: a factor loaded as a non-contiguous view
    (a checkpoint's transposed or strided tensor, say) sends the matrix to the torch path."""
    w = torch.nn.Parameter(torch.randn(16, 24))
    opt = FactoredAdam([w], lr=1e-2)
    w.grad = torch.randn(16, 24)
    opt.step()
    st = opt.state[w]
    st["exp_avg_col"] = torch.stack([st["exp_avg_col"], st["exp_avg_col"]], 1)[:, 0]
    assert not st["exp_avg_col"].is_contiguous()
    calls = []
    kernel = factored_native.adam_many
    monkeypatch.setattr(
        factored_native, "adam_many", lambda jobs: calls.extend(jobs) or kernel(jobs)
    )
    opt.step()
    assert calls == []
