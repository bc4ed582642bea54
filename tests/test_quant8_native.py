"""The native CPU kernel of the 8-bit state: bitwise the torch path's codes, the same step.

Every test compares the native kernel with the torch path it replaces (``native.available``
patched off), on the same inputs.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from native_fallback import check_off_switch_and_failed_build

pytest.importorskip("bitsandbytes", reason="DolphinFlow8bit needs bitsandbytes")

from shardflow.ops import quant8  # noqa: E402
from shardflow.ops.native import quant8 as quant8_native  # noqa: E402
from shardflow.optim.dolphinflow8bit import DolphinFlow8bit  # noqa: E402

pytestmark = pytest.mark.skipif(
    not quant8_native.available(), reason="no native kernel here (needs x86-64 AVX2 and cc)"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, params=quant8_native.host_isas())
def isa(request):
    """Every test runs on each build of the kernel this host can run: AVX2 (8 lanes, gathers),
    AVX-512 (16 lanes, permutes) where torch itself uses AVX-512, and AVX-512 VBMI (byte
    permutes decode) where the CPU has it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant8_native, "_library", quant8_native.library(request.param))
        assert quant8_native._library().sf8_lanes() == (8 if request.param == "avx2" else 16)
        yield request.param


@pytest.fixture
def torch_path(monkeypatch):
    """A context in which the torch path runs instead of the native kernel."""

    class Switch:
        def __enter__(self):
            monkeypatch.setattr(quant8_native, "available", lambda: False)

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Switch()


def _quantize(x: torch.Tensor, signed: bool):
    blocks = quant8.RowBlocks(x.shape[1])
    codes, absmax = quant8.empty_state(x.shape[0], blocks, x.device)
    quant8.quantize_(codes, absmax, x, blocks, signed)
    return codes, absmax


def _both_paths(torch_path, fn):
    native = fn()
    with torch_path:
        reference = fn()
    return native, reference


def _probes(signed: bool) -> torch.Tensor:
    """Every fp32 value within ±300 ulps of every midpoint and every code of the map (both
    signs), 0, ±1 and NaN: where a nearest-code search can go wrong."""
    code = quant8.dynamic_map(signed)
    mids = quant8_native.thresholds(signed)[:-1]
    points = torch.cat([mids, code, -mids, -code])
    bits = points.view(torch.int32).unsqueeze(1) + torch.arange(-300, 301, dtype=torch.int32)
    x = bits.view(torch.float32).reshape(-1)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("nan")])
    return torch.cat([x[x.abs() <= 1], special])


@pytest.mark.parametrize("signed", [True, False])
def test_codes_equal_the_table_quantizer_near_every_midpoint(signed, torch_path):
    """Rows of 255 probes after a 1.0 (the block absmax, so each probe is quantized as is):
    codes and scales bitwise equal to the fp16-bits table's, NaN included (code of 0; its
    block's absmax NaN in both)."""
    x = _probes(signed)
    x = torch.cat([x, x.new_zeros(-x.numel() % 255)]).view(-1, 255)
    x = torch.cat([torch.ones(x.shape[0], 1), x], 1)
    (codes, absmax), (ref_codes, ref_absmax) = _both_paths(torch_path, lambda: _quantize(x, signed))
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(absmax, ref_absmax, rtol=0, atol=0, equal_nan=True)
    assert absmax.isnan().sum() == 1


@pytest.mark.parametrize("signed", [True, False])
def test_quotients_near_every_midpoint_equal_the_torch_path(signed, torch_path):
    """The probes times block scales that are not powers of 2 (rows of 255 after the scale, the
    block absmax): the quotients land within an ulp or two of every midpoint, where the AVX-512
    kernel's ``x · (1/s)`` is too close to call and the quotient ``x / s`` decides. Codes
    bitwise equal to the torch path's."""
    q = _probes(signed)
    q = q[~q.isnan()]
    q = torch.cat([q, q.new_zeros(-q.numel() % 255)]).view(-1, 255)
    rows = []
    for scale in (0.37, 1.7, 3e-4, 12345.6):
        s = torch.full((q.shape[0], 1), scale)
        rows.append(torch.cat([s, q * s], 1))
    x = torch.cat(rows)
    assert (x[:, 1:].abs() <= x[:, :1]).all()  # the scale is each block's absmax
    (codes, _), (ref_codes, _) = _both_paths(torch_path, lambda: _quantize(x, signed))
    assert torch.equal(codes, ref_codes)


@pytest.mark.parametrize("signed", [True, False])
def test_blocks_with_nan_inf_or_zeros_equal_the_torch_path(signed, torch_path):
    """A NaN absmax divides by 1 (values past ±1 take the end codes), an inf absmax makes
    every finite value 0 and every inf NaN (code of 0); all-zero and −0 blocks: codes and
    scales bitwise equal."""
    x = torch.randn(6, 320, generator=torch.Generator().manual_seed(1)) * 3
    x[0, 5] = x[3, 0] = float("nan")
    x[1, 7] = x[3, 1] = float("inf")
    x[2, 300] = float("-inf")
    x[4], x[5, :256] = 0.0, -0.0
    (codes, absmax), (ref_codes, ref_absmax) = _both_paths(torch_path, lambda: _quantize(x, signed))
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(absmax, ref_absmax, rtol=0, atol=0, equal_nan=True)
    assert absmax.isnan().sum() == 2 and absmax.isinf().sum() == 2


@pytest.mark.parametrize("cols", [576, 1536, 100, 300, 7])
@pytest.mark.parametrize("signed", [True, False])
def test_codes_and_values_equal_the_torch_path_on_random_data(cols, signed, torch_path):
    """Nine decades of scale, head and padded tail blocks: codes, scales and dequantized values
    bitwise equal."""
    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(60, cols, generator=gen) * torch.logspace(-8, 1, 60).unsqueeze(1)
    x = x if signed else x.square()
    blocks = quant8.RowBlocks(cols)

    def run():
        codes, absmax = _quantize(x, signed)
        return codes, absmax, quant8.dequantize(codes, absmax, blocks, signed, torch.float32)

    for a, b in zip(*_both_paths(torch_path, run)):
        assert torch.equal(a, b)


def test_two_moments_and_fp64_input_take_the_native_path_alike(torch_path):
    blocks = quant8.RowBlocks(300)
    m = torch.randn(9, 300, dtype=torch.float64) * 1e-3
    x = quant8.pad_rows(torch.stack([m, m.square()]), blocks)

    def run():
        states = [(*quant8.empty_state(9, blocks, m.device), s) for s in (True, False)]
        quant8.quantize_many_(states, x, blocks)
        values = quant8.dequantize_many(states, blocks, torch.float64)
        return [t for s in states for t in s[:2]] + [values]

    native, ref = _both_paths(torch_path, run)
    assert native[-1].dtype == torch.float64
    for a, b in zip(native, ref):
        assert torch.equal(a, b)


def test_row_ranges_on_two_threads_equal_one_thread():
    """Blocks never cross rows: splitting the rows over a thread pool changes nothing."""
    x = torch.randn(400, 576)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(_quantize(x, signed=True))
    torch.set_num_threads(1)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# -- the fused step ---------------------------------------------------------------------------


def _model(cols: int):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(cols, 192), torch.nn.Tanh(), torch.nn.Linear(192, 576)
    )


def _run(model, opt, steps: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, model[0].in_features, generator=gen)
    y = torch.randn(32, 576, generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


STEP_CONFIGS = [
    {},
    {"nesterov": False, "weight_decay": 0.0},
    {"vector_mode": "flat", "gradient_clipping": 1e-3},
    {"ortho_mode": None, "momentum": 0.3},
    {"gradient_clipping": 1e-3, "compiled": True},
]


@pytest.mark.parametrize(
    "config", STEP_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default"
)
@pytest.mark.parametrize("cols", [64, 100])
def test_native_step_equals_the_torch_slab_step(config, cols, torch_path, monkeypatch):
    """One step from the same 8-bit state (after 3 steps): the native loop against the torch slab
    route (dequantize, eager rule, requantize). The native rule does the eager rule's operations
    in its order, one rounding each, but vectorized ATen kernels may fuse a multiply-add, so the
    weights are held to 1e-6 (lr 1e-2; a wrong scale, fold or bias correction is O(lr)) and a
    requantized moment may land across a code midpoint: codes at most one step apart at < 0.1%
    of positions. Covers ⊥Grad per row and flat, the clip factor, no Nesterov, no weight decay,
    μ < 0.5 (the other branch of lerp), a padded tail (rows of 100 = 64 + 36), and
    ``compiled=True`` (the clipping pass reads the raw gradient)."""
    calls = []
    step_rows = quant8_native.step_rows
    monkeypatch.setattr(
        quant8_native, "step_rows", lambda *a, **k: calls.append(step_rows(*a, **k))
    )
    model = _model(cols)
    opt = DolphinFlow8bit(model.parameters(), lr=1e-2, **config)
    _run(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    def one_step():
        model.load_state_dict(saved_model)
        step = DolphinFlow8bit(model.parameters(), lr=1e-2, **config)
        step.load_state_dict(copy.deepcopy(saved_opt))
        _run(model, step, 1)
        codes = [s[k] for s in step.state.values() for k in ("exp_avg", "exp_avg_sq")]
        return [p.detach().clone() for p in model.parameters()], codes

    (w, codes), (ref_w, ref_codes) = _both_paths(torch_path, one_step)
    assert len(calls) == 2 * 4  # the native loop ran: 2 quantized weights, 3 + 1 steps
    quantized = [(a, b) for a, b in zip(codes, ref_codes) if a.dtype == torch.uint8]
    assert len(quantized) == 4  # both moments of both weight matrices
    for a, b in zip(w, ref_w):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in quantized:
        assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 1e-3


# -- building ---------------------------------------------------------------------------------


def test_off_switch_and_a_failed_build_fall_back_to_torch(monkeypatch, tmp_path):
    def step():  # the optimizer still steps, with 8-bit state
        model = _model(64)
        opt = DolphinFlow8bit(model.parameters(), lr=1e-2)
        _run(model, opt, 1)
        assert opt.state[model[0].weight]["exp_avg"].dtype == torch.uint8

    check_off_switch_and_failed_build(monkeypatch, tmp_path, quant8_native._library, step)


@pytest.mark.skipif(
    "avx512vbmi" not in quant8_native.host_isas(), reason="needs a CPU with AVX-512 VBMI"
)
@pytest.mark.parametrize("isa", ["avx2"], indirect=True)  # once: the test picks the builds
def test_a_build_the_compiler_refuses_falls_back_to_the_next(isa, monkeypatch, tmp_path):
    """Where the compiler does not know AVX-512 VBMI, the host's kernel is the AVX-512 build;
    where it knows no AVX-512, the AVX2 build (not the torch path); and it quantizes as the
    torch path does."""
    real = shutil.which(os.environ.get("CC", "cc"))
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(2))
    for refused, expected in (("-mavx512vbmi", "avx512"), ("-mavx512f", "avx2")):
        cc = tmp_path / f"cc{refused}"
        cc.write_text(
            f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "{refused}" ] && exit 1; done\n'
            f'exec {real} "$@"\n'
        )
        cc.chmod(0o755)
        monkeypatch.setenv("CC", str(cc))
        monkeypatch.setenv("SHARDFLOW_CACHE_DIR", str(tmp_path / refused))
        monkeypatch.setattr(quant8_native, "_library", quant8_native.host_library())
        assert quant8_native.active_isa() == expected
        codes, absmax = _quantize(x, signed=True)
        monkeypatch.setattr(quant8_native, "available", lambda: False)
        assert torch.equal(codes, _quantize(x, signed=True)[0])
        monkeypatch.undo()
