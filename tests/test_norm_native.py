"""The native gradient-norm kernel (:mod:`shardflow.ops.native.norm`) and its use by the base.

The kernel sums the squares in fp64 (exact products), so against an fp64 reference it differs
only by the order of the fp64 additions: ``rtol=1e-12``. Thread counts: bit-identical (pieces
of fixed size, added in order)."""

from __future__ import annotations

import math

import pytest
import torch
from native_fallback import check_off_switch_and_failed_build

from shardflow.ops.listops import ListOps
from shardflow.ops.native import norm as norm_native
from shardflow.optim.base import _sum_sq
from shardflow.optim.dolphinflow import DolphinFlow

pytestmark = pytest.mark.skipif(
    not norm_native.available(), reason="no native kernel here (needs x86-64 AVX2 and cc)"
)

# empty, below one vector, across the four-stream split, across piece boundaries
SIZES = [0, 1, 7, 31, 32, 33, 100, 1000, norm_native.PIECE - 1, norm_native.PIECE + 33, 600_001]


def test_sums_equal_an_fp64_reference_on_every_size():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=gen) * 3 for n in SIZES]
    got = norm_native.sq_norms(xs)
    want = torch.stack([x.double().square().sum() for x in xs])
    assert got.dtype == torch.float64 and got.shape == (len(SIZES),)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_nan_and_inf_reach_the_sum():
    x = torch.ones(70_000)
    x[69_999] = float("nan")
    y = torch.ones(70_000)
    y[5] = float("inf")
    got = norm_native.sq_norms([x, y, torch.ones(3)])
    assert math.isnan(got[0]) and math.isinf(got[1]) and got[2] == 3


def test_thread_counts_give_identical_sums():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, generator=gen) for n in (3 * norm_native.PIECE + 17, 12_345, 1 << 20)]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(norm_native.sq_norms(xs))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_the_base_sums_native_and_other_gradients_together(monkeypatch):
    """fp32 contiguous gradients go through the kernel, the rest (bf16, a transposed view)
    through torch's ops; the total is the torch path's to fp32 rounding (``torch.dot`` of fp32
    gradients returns fp32)."""
    gen = torch.Generator().manual_seed(2)
    grads = [
        torch.randn(300, 70, generator=gen),
        torch.randn(50, 40, generator=gen).bfloat16(),
        torch.randn(64, 32, generator=gen).t(),
        torch.randn(9, generator=gen),
    ]
    calls = []
    kernel = norm_native.sq_norms
    monkeypatch.setattr(norm_native, "sq_norms", lambda ts: calls.append(len(ts)) or kernel(ts))
    total = _sum_sq(grads, ListOps(foreach=True))
    assert calls == [2]
    monkeypatch.setattr(norm_native, "usable", lambda t: False)
    want = _sum_sq(grads, ListOps(foreach=True))
    assert calls == [2] and total.dtype == want.dtype == torch.float64
    torch.testing.assert_close(total, want, rtol=1e-6, atol=0)


def test_clipping_with_the_kernel_equals_the_torch_path(monkeypatch):
    """One clipped DolphinFlow step: the kernel's norm and torch's give the same weights."""

    def step():
        gen = torch.Generator().manual_seed(3)
        w = torch.nn.Parameter(torch.randn(40, 30, generator=gen))
        opt = DolphinFlow([w], lr=1e-2, gradient_clipping=0.1)
        w.grad = torch.randn(40, 30, generator=gen) * 10
        opt.step()
        return w.detach()

    with_kernel = step()
    monkeypatch.setattr(norm_native, "usable", lambda t: False)
    torch.testing.assert_close(with_kernel, step(), rtol=1e-6, atol=1e-7)


def test_a_failed_openmp_link_builds_serial(monkeypatch, tmp_path):
    """Where linking against torch's OpenMP runtime fails, the kernel is built without OpenMP
    (its pragmas ignored) and still gives the same sums."""
    from shardflow.ops.native import build  # noqa: PLC0415

    monkeypatch.setenv("SHARDFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "openmp_flags", lambda: ["-fopenmp", "-lno_such_openmp_runtime"])
    lib = norm_native._library.variant("norm_test")
    path = lib._build_any()
    assert lib.built_flags == [*lib.base_flags, *build.SERIAL]
    assert path.exists() and list(tmp_path.glob("norm_test_*.so")) == [path]
    monkeypatch.setattr(norm_native, "_library", lib)
    x = torch.randn(1 << 20)
    torch.testing.assert_close(
        norm_native.sq_norms([x])[0], x.double().square().sum(), rtol=1e-12, atol=0
    )


def test_off_switch_and_a_failed_build_fall_back_to_torch(monkeypatch, tmp_path):
    grads = [torch.randn(300, 70), torch.randn(9)]

    def norm():  # the base's pass, through torch's ops
        want = sum(g.double().square().sum() for g in grads)
        torch.testing.assert_close(_sum_sq(grads, ListOps(foreach=True)), want, rtol=1e-6, atol=0)

    check_off_switch_and_failed_build(monkeypatch, tmp_path, norm_native._library, norm)
