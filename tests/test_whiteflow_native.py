"""WhiteFlow's native CPU kernels (:mod:`shardflow.ops.native.whiteflow`) against its torch path.

Tolerances. The kernels do the torch path's operations in its order (fused multiply-add where
torch's vectorized ``lerp`` uses one) and draw the same stochastic-rounding bits, so:

- **element-wise**: momentum and second moment bit-identical; weights within one fp32 ulp
  (``rtol=2⁻²²``, plus ``η·ulp(u)`` absolute): torch's CPU ``sqrt`` is not correctly rounded
  (one ulp off on ~15 % of elements here, ``test_torch_sqrt_is_what_differs``), the kernel's is;
- **hidden matrices**: the row sums and the channel scale's norms are summed in fp64 in another
  order than torch's reductions, the momentum is projected before the bias correction and the
  product is MKL's over a chunk of rows. Where a product's terms cancel, that order shows:
  coefficients to ``rtol=5e-5``, the weight change to ``1e-4``; a stochastic rounding of a state
  element then moves by one bf16 ulp with probability ≈ ulps/2¹⁶ (checked as rare, not absent);
- **optimizer runs** (native step against the torch path, five steps): weights as the compiled
  path's test (tests/test_whiteflow.py ``test_compiled_equals_eager``: a flip moves its row's
  update by ≤ ``lr·2⁻⁸`` per remaining step; bf16 weights as the pair weight + Kahan
  compensation); bf16 states within two bf16 ulps of the value or one of the tensor's largest
  (a flip persists a few steps through the momentum), under 1 % of elements different.

Row results and the element-wise step do not depend on the thread count (bit-identical).
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from native_fallback import check_off_switch_and_failed_build

from shardflow.ops.native import whiteflow as native
from shardflow.ops.projection import projection
from shardflow.optim.whiteflow import (
    WhiteFlow,
    beta2_at,
    second_moment_weight,
    whiteflow_apply_,
    whiteflow_elementwise_,
    whiteflow_scales_,
)

pytestmark = pytest.mark.skipif(
    not native.available(), reason="no native kernel here (needs x86-64 AVX2 and cc)"
)

ULP = 2**-22
"""One fp32 ulp, relative (2⁻²³ to 2⁻²² of the value)."""


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hyper(t=3, clip=0.7, lr=1e-2, wd=0.1, eps=1e-8):
    b2 = beta2_at(0.999, t)
    return [clip, 0.1, 1 / (1 - 0.9**t), b2, 1 - b2, 1 / second_moment_weight(0.999, t), eps,
            1 - lr * wd, lr]  # fmt: skip


def _state(shape, gen, scale=0.1):
    return (torch.randn(shape, generator=gen) * scale).bfloat16()


def _second(shape, gen):
    return (torch.rand(shape, generator=gen) * 1e-2).bfloat16()


@pytest.mark.parametrize("numel", [1, 7, 8, 13, 1000, 70_001])
@pytest.mark.parametrize("keys", [(12345, 0, 678, 0), (2**32 - 5, 2**32 - 3, 99, 2**32 - 3), None])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_elementwise_step_equals_the_torch_path(numel, keys, grad_dtype):
    """Odd sizes (the 8-lane tails), offsets that wrap the 32-bit counter, round to nearest, a
    bf16 gradient (a bf16 weight's)."""
    gen = torch.Generator().manual_seed(numel)
    w, g = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen).to(grad_dtype)
    m, v = _state(numel, gen), _second(numel, gen)
    hyper = _hyper()
    want = [w.clone(), m.clone(), v.clone()]
    key_t = None if keys is None else torch.tensor(keys, dtype=torch.int64)
    whiteflow_elementwise_(want[0], g, want[1], want[2], torch.tensor(hyper), key_t)
    got = [w.clone(), m.clone(), v.clone()]
    usq = native.elementwise_many(
        [native.Job(got[0], g, got[1], got[2], hyper, keys)], norm_only=True
    )
    torch.testing.assert_close(got, [w, m, v], rtol=0, atol=0)  # norm_only writes nothing
    u = whiteflow_elementwise_(w.clone(), g, m.clone(), v.clone(), torch.tensor(hyper), key_t,
                               apply=False)  # fmt: skip
    torch.testing.assert_close(usq[0], u.double().square().sum(), rtol=1e-6, atol=0)
    native.elementwise_many([native.Job(got[0], g, got[1], got[2], hyper, keys)])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
    torch.testing.assert_close(got[0], want[0], rtol=ULP, atol=2e-8)  # atol: η·ulp(u), |u| ≲ 10


def test_torch_sqrt_is_what_differs():
    """The one difference of the element-wise step: torch's CPU sqrt is not correctly rounded
    (numpy's, and the kernel's vsqrtps, are), by one ulp."""
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    exact = torch.from_numpy(np.sqrt(x.numpy()))
    assert torch.equal(x.double().sqrt().float(), exact)
    torch.testing.assert_close(x.sqrt(), exact, rtol=ULP, atol=0)


def _rows_problem(rows, n, r, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=gen) * 0.3
    g = torch.randn(rows, n, generator=gen)
    m = _state((rows, n), gen)
    v = _second((rows, r), gen)
    return w, g, m, v


SHAPES = [(1, 5), (7, 13), (33, 8), (3, 1000), (130, 64), (300, 600)]


@pytest.mark.parametrize("rows,n", SHAPES)
@pytest.mark.parametrize("apply", [True, False])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_projected_rows_equal_the_torch_path(rows, n, apply, grad_dtype, monkeypatch):
    """Scales, second moment, momentum and weights; several chunks for the larger shapes."""
    monkeypatch.setattr(native, "CHUNK", 4096)  # 300x600: 6 rows a chunk, 50 chunks
    r = min(16, n)
    w, g, m, v = _rows_problem(rows, n, r, rows * n)
    g = g.to(grad_dtype)
    proj = projection(3, n, r, 1)
    hyper, keys = _hyper(), (777, 5 * n, 4242, 5 * r)
    ref = [x.clone() for x in (w, m, v)]
    h, k = torch.tensor(hyper), torch.tensor(keys)
    coef_ref = whiteflow_scales_(ref[0], g, ref[1], ref[2], proj, h, k, route="projected")
    got = [x.clone() for x in (w, m, v)]
    job = native.Job(got[0], g, got[1], got[2], hyper, keys)
    coef = native.rows_projected(job, proj, native.Scratch(), apply=apply)
    torch.testing.assert_close(coef, coef_ref, rtol=5e-5, atol=1e-7)
    assert (got[2] != ref[2]).float().mean() < 2e-3  # a flipped rounding is rare
    torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=2**-7, atol=0)
    if not apply:
        torch.testing.assert_close(got[:2], [w, m], rtol=0, atol=0)
        native.rows_apply(job, coef)
    whiteflow_apply_(ref[0], g, ref[1], coef_ref, h, k)
    assert (got[1] != ref[1]).float().mean() < 2e-3
    torch.testing.assert_close(got[1].float(), ref[1].float(), rtol=2**-7, atol=1e-30)
    torch.testing.assert_close(got[0] - w, ref[0] - w, rtol=1e-4, atol=1e-7)  # the weight change


@pytest.mark.parametrize("rows,n", SHAPES)
@pytest.mark.parametrize("apply", [True, False])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_dense_rows_equal_the_torch_path(rows, n, apply, grad_dtype):
    w, g, m, v = _rows_problem(rows, n, n, rows + n)
    g = g.to(grad_dtype)
    hyper, keys = _hyper(t=150, eps=0.0), (31, 2 * n, 32, 2 * n)  # eps = 0: no 0/0 in the tails
    ref = [x.clone() for x in (w, m, v)]
    h, k = torch.tensor(hyper), torch.tensor(keys)
    coef_ref = whiteflow_scales_(ref[0], g, ref[1], ref[2], None, h, k, route="dense")
    whiteflow_apply_(ref[0], g, ref[1], coef_ref, h, k)
    got = [x.clone() for x in (w, m, v)]
    job = native.Job(got[0], g, got[1], got[2], hyper, keys)
    coef = native.rows_dense(job, apply=apply)
    assert coef.isfinite().all()
    torch.testing.assert_close(coef, coef_ref, rtol=5e-5, atol=1e-7)
    if not apply:
        native.rows_apply(job, coef)
    for a, b in zip(got[1:], ref[1:]):
        assert (a != b).float().mean() < 2e-3
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-30)
    torch.testing.assert_close(got[0] - w, ref[0] - w, rtol=1e-4, atol=1e-7)


def test_zero_rows_and_parallel_rows_fold_as_the_torch_path():
    """A zero gradient row, a zero weight row, and a gradient parallel to its weight."""
    w, g, m, v = _rows_problem(4, 24, 24, 0)
    w[1] = 0.0
    g[2] = 0.0
    g[3] = -2.5 * w[3]
    m.zero_()
    hyper, keys = _hyper(t=1), None
    coef_ref = whiteflow_scales_(w.clone(), g, m.clone(), v.clone(), None, torch.tensor(hyper),
                                 None, route="dense")  # fmt: skip
    coef = native.rows_dense(native.Job(w.clone(), g, m.clone(), v.clone(), hyper, keys),
                             apply=False)  # fmt: skip
    torch.testing.assert_close(coef, coef_ref, rtol=1e-5, atol=1e-7)
    assert coef[3, 0] == 0 and coef[3, 1] == 0 and coef[2, 2] == 0


def test_results_do_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(9)
    n = 300_001
    ew = [torch.randn(n, generator=gen), torch.randn(n, generator=gen), _state(n, gen),
          _second(n, gen)]  # fmt: skip
    rows = [*_rows_problem(2000, 96, 96, 1)]
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        e = [x.clone() for x in ew]
        native.elementwise_many([native.Job(*e, _hyper(), (5, 0, 6, 0))])
        usq = native.elementwise_many([native.Job(*ew, _hyper(), (5, 0, 6, 0))], norm_only=True)
        d = [x.clone() for x in rows]
        coef = native.rows_dense(native.Job(*d, _hyper(), (7, 0, 8, 0)), apply=True)
        runs.append([*e, usq, *d, coef])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- the optimizer ----------------------------------------------------------------------------

CONFIGS = [
    {},
    {"second_moment": "dense"},
    {"norm_growth_limit": 1.01, "rank": 16},
    {"second_moment": "dense", "norm_growth_limit": 1.01, "stochastic_rounding": False},
    {"ortho_mode": None, "norm_growth_limit": 1.01, "eps": 0.0},
    {"stochastic_rounding": False, "weight_decay": 0.0, "gradient_clipping": None},
]
MODEL = {
    "embed_tokens.weight": (37, 24),
    "l1.weight": (64, 48),
    "l2.weight": (33, 61),
    "conv.weight": (6, 3, 5),
    "norm.weight": (61,),
    "big.weight": (300, 700),
}


def _train(config, steps=5, lr=1e-2, dtype=torch.float32):
    torch.manual_seed(0)
    named = [(n, torch.nn.Parameter((torch.randn(s) * 0.1).to(dtype))) for n, s in MODEL.items()]
    opt = WhiteFlow(named, lr=lr, **config)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return named, opt


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_equals_the_torch_path(config, dtype, monkeypatch):
    """fp32 weights, and bf16 weights (an fp32 working copy and a bf16 gradient reach the
    kernels; the base writes the weights back, Kahan-compensated)."""
    calls = []
    for name in ("elementwise_many", "rows_projected", "rows_dense"):
        real = getattr(native, name)
        monkeypatch.setattr(
            native, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k)
        )
    fast, opt_n = _train(config, dtype=dtype)
    assert calls, "the native kernels must have run"
    calls.clear()
    with monkeypatch.context() as off:
        off.setattr(native, "available", lambda: False)
        slow, opt_t = _train(config, dtype=dtype)
    assert calls == []
    lr, steps = 1e-2, 5
    for (name, a), (_, b) in zip(fast, slow):
        # a bf16 weight is the pair (w, Kahan compensation): a rounding flip moves between them
        held = [p.float() + o.state[p].get("kahan", torch.zeros(())).float() for p, o in
                ((a, opt_n), (b, opt_t))]  # fmt: skip
        torch.testing.assert_close(*held, rtol=0, atol=steps * lr * 2**-8, msg=name)
        for key, value in opt_t.state[b].items():
            got = opt_n.state[a][key]
            if key == "kahan":
                continue
            if value.dtype == torch.bfloat16:
                # a flip persists a few steps through the momentum: two bf16 ulps of the value,
                # or one of the tensor's largest (an element that has since shrunk)
                scale = value.float().abs().max().item()
                torch.testing.assert_close(
                    got.float(), value.float(), rtol=2**-6, atol=2**-8 * scale
                )
                assert (got != value).float().mean() < 0.01, (name, key)
            else:
                torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6, msg=(name, key))


def test_native_step_is_the_default_on_the_cpu_and_compiled_true_is_not(monkeypatch):
    used = []
    real = native.elementwise_many
    monkeypatch.setattr(native, "elementwise_many", lambda *a, **k: used.append(1) or real(*a, **k))
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    WhiteFlow([p]).step()
    assert used == [1]
    monkeypatch.setattr("shardflow.optim.whiteflow.each", lambda fn, *lists, **kw: [None] * 1)
    WhiteFlow([p], compiled=True).step()
    assert used == [1]


def test_float64_and_bf16_states_elsewhere_take_the_torch_path():
    p = torch.nn.Parameter(torch.randn(5, 6, dtype=torch.float64))
    assert not native.usable(p, p, p, p)
    w = torch.randn(5, 6)
    m = torch.zeros(5, 6, dtype=torch.bfloat16)
    assert native.usable(w, w, m, m)
    assert not native.usable(w.t(), w.t(), m.t(), m.t())


def _rss_kib(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_a_step_allocates_under_one_byte_per_parameter():
    """Peak RSS growth of the first and a later step, with free heap memory returned to the
    kernel first (so reused memory counts): the torch path grew ~24 B/param."""
    shapes = {"embed_tokens.weight": (8192, 256), "a.weight": (1024, 512), "b.weight": (512, 1024),
              "c.weight": (1536, 512), "norm.weight": (512,)}  # fmt: skip
    named = [(n, torch.nn.Parameter(torch.randn(s) * 0.02)) for n, s in shapes.items()]
    for _, p in named:
        p.grad = torch.randn(p.shape) * 1e-3
    count = sum(p.numel() for _, p in named)
    opt = WhiteFlow(named)
    libc = ctypes.CDLL("libc.so.6")
    for step in range(3):
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kib("VmRSS")
        opt.step()
        grew = (_rss_kib("VmHWM") - before) * 1024
        assert grew < count, f"step {step + 1} grew {grew / count:.2f} B/param"


def test_off_switch_and_failed_build_leave_the_torch_path(monkeypatch, tmp_path):
    def torch_path():
        p = torch.nn.Parameter(torch.ones(4, 8))
        p.grad = torch.full((4, 8), 0.5)
        WhiteFlow([p], lr=0.1).step()
        assert p.isfinite().all() and not torch.equal(p, torch.ones(4, 8))

    check_off_switch_and_failed_build(monkeypatch, tmp_path, native._library, torch_path)


def test_chunk_rows_cover_wide_matrices():
    assert native.chunk_rows(576) == native.CHUNK // 576
    assert native.chunk_rows(10 * native.CHUNK) == 1
    assert math.isclose(native.chunk_rows(1), native.CHUNK)
