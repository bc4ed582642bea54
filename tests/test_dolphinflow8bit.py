"""DolphinFlow8bit: row-aligned 8-bit state, the same trajectory as DolphinFlow, lazy import."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="DolphinFlow8bit needs bitsandbytes")

from shardflow import DolphinFlow  # noqa: E402
from shardflow.ops import quant8  # noqa: E402
from shardflow.optim import dolphinflow8bit  # noqa: E402
from shardflow.optim.dolphinflow8bit import DolphinFlow8bit  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _half_gap(signed: bool) -> float:
    """Half the widest gap between neighbouring codes of the dynamic map (its top decade).

    Rounding to the nearest code errs by at most this, times the block's absmax. The 1% slack
    covers near-ties: bitsandbytes' search may pick either code within ~1e-5 of a midpoint.
    """
    code = quant8.dynamic_map(signed)
    return float((code[1:] - code[:-1]).max()) / 2 * 1.01


def _block_absmax(x: torch.Tensor, blocks: quant8.RowBlocks) -> torch.Tensor:
    """Per element, the absmax of the row block it falls in (computed independently)."""
    rows = x.shape[0]
    padded = x.new_zeros(rows, blocks.code_cols)
    padded[:, : blocks.cols] = x.abs()
    parts = []
    if blocks.head:
        head = padded[:, : blocks.head].reshape(rows, -1, quant8.HEAD_BLOCK).amax(-1)
        parts.append(head.repeat_interleave(quant8.HEAD_BLOCK, 1))
    if blocks.tail:
        tail = padded[:, blocks.head :].reshape(rows, -1, quant8.TAIL_BLOCK).amax(-1)
        parts.append(tail.repeat_interleave(quant8.TAIL_BLOCK, 1))
    return torch.cat(parts, 1)[:, : blocks.cols]


def _roundtrip(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    blocks = quant8.RowBlocks(x.shape[1])
    codes, absmax = quant8.empty_state(x.shape[0], blocks, x.device)
    quant8.quantize_(codes, absmax, x, blocks, signed)
    return codes, absmax, quant8.dequantize(codes, absmax, blocks, signed, torch.float32)


# -- the quantization layout ------------------------------------------------------------------


@pytest.mark.parametrize(
    "cols,code_cols,blocks",
    [(576, 576, 3), (1536, 1536, 6), (256, 256, 1), (100, 128, 2), (300, 320, 2), (7, 64, 1)],
)
def test_rows_are_cut_into_head_blocks_of_256_and_tail_blocks_of_64(cols, code_cols, blocks):
    b = quant8.RowBlocks(cols)
    assert (b.code_cols, b.blocks) == (code_cols, blocks)
    codes, absmax = quant8.empty_state(5, b, torch.device("cpu"))
    assert codes.shape == (5, code_cols) and codes.dtype == torch.uint8
    assert absmax.shape == (5, blocks) and absmax.dtype == torch.float32


@pytest.mark.parametrize("cols", [576, 1536, 100, 7])
@pytest.mark.parametrize("signed", [True, False])
def test_roundtrip_error_is_within_half_a_code_step_of_the_block_absmax(cols, signed):
    torch.manual_seed(cols)
    # rows spanning six decades of scale: every row has its own blocks, hence its own scales
    x = torch.randn(40, cols) * torch.logspace(-6, 0, 40).unsqueeze(1)
    x = x if signed else x.square()
    _, absmax, y = _roundtrip(x, signed)
    am = _block_absmax(x, quant8.RowBlocks(cols))
    bound = _half_gap(signed)
    assert bound < (0.0072 if signed else 0.0036)  # 64 / 128 codes across [0.1, 1]
    assert ((y - x).abs() <= bound * am).all()
    assert torch.equal(absmax.amax(1), x.abs().amax(1))
    if not signed:
        assert (y >= 0).all()


@pytest.mark.parametrize("signed", [True, False])
def test_cpu_codes_are_the_nearest_entries_of_the_map(signed):
    """The fp16-bits table picks exactly the nearest code (brute force over all 256; ties aside).

    bitsandbytes' own CPU kernel does not always: on this data it misses the nearest code for
    95 (signed) / 2058 (unsigned) of 65536 values, by ≤ 3e-5 of the block scale.
    """
    torch.manual_seed(0)
    x = torch.randn(64, 1024) * torch.logspace(-6, 0, 64).unsqueeze(1)
    x = x if signed else x.square()
    codes, scale, _ = _roundtrip(x, signed)
    code = quant8.dynamic_map(signed).double()
    normed = (x.view(64, 4, 256) / scale.unsqueeze(-1)).reshape(-1, 1).double()
    distance = (normed - code).abs()
    best = distance.min(1).values
    chosen = distance.gather(1, codes.reshape(-1, 1).long()).squeeze(1)
    assert torch.equal(chosen, best)


def test_zeros_roundtrip_to_zeros():
    _, absmax, y = _roundtrip(torch.zeros(3, 600), signed=True)
    assert not absmax.any() and not y.any()


@pytest.mark.parametrize("cols", [576, 100])
def test_a_row_shard_quantizes_to_exactly_the_rows_of_the_whole(cols):
    """Blocks never cross rows, so any row split (uneven, empty) gives the same codes and scales."""
    torch.manual_seed(0)
    x = torch.randn(11, cols)
    codes, absmax, _ = _roundtrip(x, signed=True)
    for bounds in ([0, 6, 11], [0, 3, 6, 9, 11], [0, 0, 4, 11]):
        pieces = [_roundtrip(x[a:b], signed=True) for a, b in zip(bounds, bounds[1:])]
        assert torch.equal(torch.cat([p[0] for p in pieces]), codes)
        assert torch.equal(torch.cat([p[1] for p in pieces]), absmax)


# -- which parameters are quantized -----------------------------------------------------------


def test_small_and_one_dimensional_params_keep_fp32_state():
    params = {
        "big": torch.nn.Parameter(torch.zeros(64, 64)),  # 4096 elements: quantized
        "small": torch.nn.Parameter(torch.zeros(63, 65)),  # 4095: fp32
        "vector": torch.nn.Parameter(torch.zeros(8192)),  # 1-D: fp32 (a row is one value)
        "conv": torch.nn.Parameter(torch.zeros(16, 8, 3, 3)),  # 1152 < 4096: fp32
        "conv_big": torch.nn.Parameter(torch.zeros(64, 32, 3, 3)),  # rows of 288 values
    }
    opt = DolphinFlow8bit(params.values())
    dtypes = {k: opt.state[p]["exp_avg"].dtype for k, p in params.items()}
    assert dtypes == {
        "big": torch.uint8,
        "small": torch.float32,
        "vector": torch.float32,
        "conv": torch.float32,
        "conv_big": torch.uint8,
    }
    big = opt.state[params["conv_big"]]
    assert big["exp_avg"].shape == (64, 320) and big["exp_avg_absmax"].shape == (64, 2)
    assert big["exp_avg_sq"].dtype == torch.uint8
    assert "exp_avg_absmax" not in opt.state[params["small"]]
    assert set(DolphinFlow8bit.state_layout) >= set(big)
    assert all(DolphinFlow8bit.state_layout[k] == "rows" for k in ("exp_avg", "exp_avg_absmax"))


def test_without_adaptive_lr_only_the_momentum_is_stored():
    p = torch.nn.Parameter(torch.zeros(64, 64))
    opt = DolphinFlow8bit([p], adaptive_lr=False)
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_absmax", "momentum", "momentum_weight"}


def test_state_bytes_per_param_counts_codes_and_scales():
    opt = DolphinFlow8bit([torch.nn.Parameter(torch.zeros(1536, 576))])
    # two moments × (576 codes + 3 fp32 scales) per row of 576
    assert opt.state_bytes_per_param() == pytest.approx(2 * (576 + 12) / 576)


# -- the update rule is DolphinFlow's ---------------------------------------------------------


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 192),
        torch.nn.Tanh(),
        torch.nn.Linear(192, 576),
        torch.nn.Tanh(),
        torch.nn.Linear(576, 8),
    ).to(dtype)


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 64, generator=g, dtype=dtype)
    return x, torch.randn(32, 8, generator=g, dtype=dtype)


def _train(model, opt, steps, data=None):
    x, y = data or _data(next(model.parameters()).dtype)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_with_nothing_quantized_it_is_dolphinflow_exactly():
    results = []
    for cls, extra in ((DolphinFlow, {}), (DolphinFlow8bit, {"min_8bit_size": 10**9})):
        model = _model()
        _train(model, cls(model.parameters(), lr=1e-2, **extra), 5)
        results.append(_params(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


CONFIGS = [
    {"ortho_mode": "vector"},
    {"ortho_mode": "vector", "nesterov": False},
    {"ortho_mode": "block", "block_size": 64},
    {"ortho_mode": "matrix", "trust_region": 0.05},
    {"ortho_mode": None, "dynamic_momentum": True},
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_8bit_follows_the_32bit_trajectory(config):
    """40 steps at lr 1e-3 on 256 samples: the 8-bit run stays within a few % of the 32-bit one.

    Each stored moment value is off by at most half a code step (≈0.7% of its block's absmax,
    see above) after every step. Measured on this problem: the weight change of every tensor
    differs by ≤ 3% (vector, element-wise) and ≤ 9.4% (block, matrix: Newton-Schulz amplifies
    small differences) of its length; final losses agree within 0.25%. Tolerances: 15% and 1%.
    Nesterov on vs off differ by far more (next test).
    """
    g = torch.Generator().manual_seed(1)
    data = torch.randn(256, 64, generator=g), torch.randn(256, 8, generator=g)
    runs = {}
    for cls in (DolphinFlow, DolphinFlow8bit):
        model = _model()
        start = _params(model)
        opt = cls(model.parameters(), lr=1e-3, **config)
        losses = _train(model, opt, 40, data)
        runs[cls] = (start, _params(model), losses, opt)
    start, ref, ref_losses, ref_opt = runs[DolphinFlow]
    _, got, losses, opt = runs[DolphinFlow8bit]
    assert [s["exp_avg"].dtype for s in opt.state.values()].count(torch.uint8) == 3
    for s0, a, b in zip(start, ref, got):
        assert (a - b).norm() <= 0.15 * (a - s0).norm()
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=0.01)
    assert losses[-1] < 0.7 * losses[0]
    for p_ref, p in zip(ref_opt.state, opt.state):
        assert torch.equal(opt.state[p]["step"], ref_opt.state[p_ref]["step"])
        for key in ("momentum", "momentum_weight"):
            torch.testing.assert_close(
                opt.state[p][key], ref_opt.state[p_ref][key], rtol=0, atol=1e-2
            )


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("mode", ["vector", None])
def test_first_step_equals_dolphinflow_up_to_rounding(compiled, mode):
    """From zero moments (quantized exactly) the first step's weights use the unrounded new
    moments: the slab route must give DolphinFlow's step, ⊥Grad fold, clip factor (clipping on:
    the compiled pass reads raw gradients) and bias corrections included; eps 1e-5, near the
    clipped gradients' size, so that the step depends on their scale. Measured: bitwise equal
    (the same operations on the same values); held to 1e-6 — a doubled clip factor measured
    8e-3, a wrong fold or correction is O(lr)."""
    results = []
    for cls in (DolphinFlow, DolphinFlow8bit):
        model = _model()
        opt = cls(
            model.parameters(),
            lr=1e-2,
            ortho_mode=mode,
            gradient_clipping=1e-3,
            eps=1e-5,
            compiled=compiled,
        )
        _train(model, opt, 1)
        results.append(_params(model))
    assert [s["exp_avg"].dtype for s in opt.state.values()].count(torch.uint8) == 3
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_nesterov_is_applied_in_8bit():
    """Nesterov on and off give different 8-bit runs, each matching its 32-bit twin."""
    final = {}
    for cls in (DolphinFlow, DolphinFlow8bit):
        for nesterov in (True, False):
            model = _model()
            _train(model, cls(model.parameters(), lr=3e-3, nesterov=nesterov), 20)
            final[cls, nesterov] = torch.cat([p.flatten() for p in _params(model)])
    gap = (final[DolphinFlow, True] - final[DolphinFlow, False]).norm()
    for nesterov in (True, False):
        drift = (final[DolphinFlow8bit, nesterov] - final[DolphinFlow, nesterov]).norm()
        assert drift < 0.2 * gap


def test_chunked_steps_equal_whole_group_steps():
    results = []
    for chunk in (None, 1):
        model = _model()
        _train(model, DolphinFlow8bit(model.parameters(), lr=1e-2, chunk_elements=chunk), 4)
        results.append(_params(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_slabs_of_any_size_give_the_same_step(monkeypatch):
    """The torch fused route updates quantized moments a slab of rows at a time; every value's
    update is row-local, so one row per slab and whole tensors give bitwise the same run (the
    native kernel, which takes whole tensors, is switched off here)."""
    monkeypatch.setattr(quant8.native, "available", lambda: False)
    results = []
    for slab in (1, 10**9):
        monkeypatch.setattr(dolphinflow8bit, "SLAB_ELEMENTS", slab)
        model = _model()
        opt = DolphinFlow8bit(model.parameters(), lr=1e-2)
        _train(model, opt, 4)
        results.append(_params(model) + [t for s in opt.state.values() for t in s.values()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_contiguous_params_take_the_dequantized_path_with_the_same_result():
    """A transposed parameter cannot be cut into row slabs: its moments are dequantized whole and
    DolphinFlow's eager pass updates them, with the same maths in the same order. Only float
    rounding differs (another memory layout runs other SIMD/scalar loops): measured ≤ 1.1e-5
    relative on the weights (1 ulp) and identical codes; held to 2e-5 and codes at most one step
    apart at < 1% of positions (a value on a code midpoint may round either way)."""
    results = []
    for transposed in (False, True):
        torch.manual_seed(0)
        value = torch.randn(96, 64)
        weight = torch.nn.Parameter(value.t().contiguous().t() if transposed else value.clone())
        assert weight.is_contiguous() != transposed
        opt = DolphinFlow8bit([weight], lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            weight.grad = torch.randn(96, 64, generator=gen)
            weight.grad = weight.grad.t().contiguous().t() if transposed else weight.grad
            opt.step()
        state = opt.state[weight]
        results.append((weight.detach().clone(), state["exp_avg"], state["exp_avg_sq"]))
        assert state["exp_avg"].dtype == torch.uint8
    (w, m, v), (w_t, m_t, v_t) = results
    torch.testing.assert_close(w_t, w, rtol=2e-5, atol=0)
    for a, b in ((m, m_t), (v, v_t)):
        assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 0.01


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch-path"])
def test_compiled_and_eager_8bit_steps_agree(native, monkeypatch):
    """On the torch path ``compiled=True`` runs DolphinFlow's compiled element-wise pass on each
    dequantized slab (the graphs DolphinFlow's own tests compile) and eager the same maths as
    in-place ops; with the native kernel both run the native loop, and what differs is
    DolphinFlow's compiled clipping pass (it reads the raw gradient, the clip factor applied in
    the loop).

    One step from the same quantized state (after 3 eager steps): only float rounding differs
    (fused multiply-adds, operation order). The weights use this step's unrounded moments, so
    they differ by rounding only: measured ≤ 1.5e-8 (lr 1e-2), held to 1e-6; a requantized
    moment may land on the other side of a code midpoint: measured at 1e-5 of positions, one
    step apart, held to 0.1%. A wrong fold, scale, bias correction or table is off by O(lr) and
    O(1) steps. Over several steps the runs drift apart further (a flipped code of a tiny
    second moment moves that element's next update by a few %), as 8-bit and 32-bit do.
    """
    if not native:
        monkeypatch.setattr(quant8.native, "available", lambda: False)
    model = _model()
    opt = DolphinFlow8bit(model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    runs = []
    for compiled in (False, True):
        model.load_state_dict(saved_model)
        # clipping on: the compiled pass reads the raw gradient and applies the clip factor
        opt = DolphinFlow8bit(
            model.parameters(), lr=1e-2, compiled=compiled, gradient_clipping=1e-3
        )
        opt.load_state_dict(copy.deepcopy(saved_opt))  # loading aliases the tensors it is given
        _train(model, opt, 1)
        codes = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
        runs.append((_params(model), [c for c in codes if c.dtype == torch.uint8]))
    (eager, eager_codes), (comp, comp_codes) = runs
    assert len(eager_codes) == 6
    for a, b in zip(eager, comp):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for a, b in zip(eager_codes, comp_codes):
        assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 1e-3


@pytest.mark.parametrize("cols", [576, 100])
def test_both_moments_quantized_at_once_equal_each_quantized_alone(cols):
    """quantize_many_/dequantize_many serve the momentum (signed map) and the second moment
    (unsigned map) in one pass through concatenated tables: each state reads its own table."""
    torch.manual_seed(0)
    blocks = quant8.RowBlocks(cols)
    m = torch.randn(7, cols) * torch.logspace(-4, 0, 7).unsqueeze(1)
    alone = [_roundtrip(m, True), _roundtrip(m.square(), False)]
    states = [(*quant8.empty_state(7, blocks, m.device), s) for s in (True, False)]
    x = quant8.pad_rows(torch.stack([m, m.square()]), blocks)
    quant8.quantize_many_(states, x, blocks)
    values = quant8.dequantize_many(states, blocks, torch.float32)
    for (codes, absmax, _), (ref_codes, ref_absmax, ref_values), v in zip(states, alone, values):
        assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
        assert torch.equal(v[:, :cols], ref_values) and not v[:, cols:].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_low_and_high_precision_params_keep_8bit_state(dtype):
    model = _model(dtype=dtype)
    opt = DolphinFlow8bit(model.parameters(), lr=3e-3)
    losses = _train(model, opt, 30)
    assert losses[-1] < 0.6 * losses[0]
    weight = model[2].weight
    assert opt.state[weight]["exp_avg"].dtype == torch.uint8
    assert opt.state[weight]["exp_avg_absmax"].dtype == torch.float32
    assert weight.dtype == dtype


def test_state_dict_round_trip_keeps_codes_and_continues_identically():
    model = _model()
    opt = DolphinFlow8bit(model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3)
    expected = _params(model)

    model2 = _model(seed=7)
    model2.load_state_dict(saved_model)
    opt2 = DolphinFlow8bit(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(saved_opt)
    w = model2[2].weight
    assert opt2.state[w]["exp_avg"].dtype == torch.uint8
    assert torch.equal(opt2.state[w]["exp_avg_sq"], saved_opt["state"][2]["exp_avg_sq"])
    _train(model2, opt2, 3)
    for a, b in zip(expected, _params(model2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_32bit_state_dict_is_quantized_on_load():
    model = _model()
    opt32 = DolphinFlow(model.parameters(), lr=1e-2)
    _train(model, opt32, 3)
    saved = copy.deepcopy(opt32.state_dict())
    opt = DolphinFlow8bit(model.parameters(), lr=1e-2)
    opt.load_state_dict(saved)
    w = model[2].weight  # 576 x 192: quantized; biases keep fp32 state
    for key, signed in dolphinflow8bit.MOMENTS.items():
        codes, absmax, _ = _roundtrip(saved["state"][2][key], signed)
        assert torch.equal(opt.state[w][key], codes), key
        assert torch.equal(opt.state[w][f"{key}_absmax"], absmax), key
    assert torch.equal(opt.state[model[0].bias]["exp_avg"], saved["state"][1]["exp_avg"])
    assert saved["state"][2]["exp_avg"].dtype == torch.float32  # the caller's dict is untouched
    _train(model, opt, 2)  # steps from the converted state
    assert opt.state[w]["exp_avg"].dtype == torch.uint8


def test_an_8bit_state_dict_is_refused_by_dolphinflow():
    model = _model()
    opt8 = DolphinFlow8bit(model.parameters(), lr=1e-2)
    _train(model, opt8, 1)
    opt = DolphinFlow(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"state of parameter 0 of param group 0 holds.*absmax"):
        opt.load_state_dict(opt8.state_dict())
    assert opt.state[model[2].weight]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"min_8bit_size": -1}, r"min_8bit_size=-1 is invalid.*>= 0"),
        ({"chunk_elements": 0}, r"chunk_elements=0 is invalid.*>= 1"),
        ({"lr": -1.0}, r"lr=-1\.0 is invalid"),
    ],
)
def test_invalid_arguments_raise_named_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DolphinFlow8bit(_model().parameters(), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """The same row blocks through bitsandbytes' CUDA kernels: same trajectory as on CPU."""
    results = []
    for device in ("cpu", "cuda"):
        model = _model().to(device)
        x, y = _data()
        opt = DolphinFlow8bit(model.parameters(), lr=3e-3, ns_dtype=torch.float32)
        _train(model, opt, 20, data=(x.to(device), y.to(device)))
        assert opt.state[model[2].weight]["exp_avg"].device.type == device
        results.append([p.cpu() for p in _params(model)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)


# -- imports ----------------------------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_import_without_bitsandbytes_says_how_to_install_it():
    out = _python(
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "try:\n"
        "    import shardflow.optim.dolphinflow8bit\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    assert "ImportError: DolphinFlow8bit needs bitsandbytes: pip install 'shardflow[bnb]'" in (
        out.stdout
    ), out.stderr


def test_import_shardflow_does_not_import_bitsandbytes():
    out = _python(
        "import sys, shardflow\n"
        "print('bnb loaded' if 'bitsandbytes' in sys.modules else 'bnb not loaded')\n"
        "sys.modules['bitsandbytes'] = None\n"
        "import shardflow.optim\n"
        "print('ok')\n"
    )
    assert out.stdout.split() == ["bnb", "not", "loaded", "ok"], out.stderr


def test_shardflow_dolphinflow8bit_without_bitsandbytes_raises_install_hint(monkeypatch):
    """``shardflow.DolphinFlow8bit(...)`` with bitsandbytes absent (in this process)."""
    import shardflow  # noqa: PLC0415

    for name in ("bitsandbytes", "bitsandbytes.functional"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: ImportError
    for package, name in (("optim", "dolphinflow8bit"), ("ops", "quant8")):  # imported anew
        monkeypatch.delitem(sys.modules, f"shardflow.{package}.{name}")
        monkeypatch.delattr(getattr(shardflow, package), name, raising=False)
    with pytest.raises(ImportError, match=r"pip install 'shardflow\[bnb\]'"):
        shardflow.DolphinFlow8bit(_model().parameters())
    monkeypatch.undo()
    assert importlib.import_module("shardflow.optim.dolphinflow8bit").DolphinFlow8bit
