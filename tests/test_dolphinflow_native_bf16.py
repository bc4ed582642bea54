"""DolphinFlow's native kernel on bf16 weights (shardflow/ops/native/csrc/dolphinflow.c): it reads
the weight with its Kahan compensation and the raw gradient and writes the weight back in the
same pass. It must give the bits of the path it replaces — an fp32 working copy
(shardflow.ops.precision.working_copy), the fp32 kernel, and the write-back (store_weight_)."""

from __future__ import annotations

import pytest
import torch

import shardflow
from shardflow.ops import precision as lowp
from shardflow.ops.native import dolphinflow as native
from shardflow.optim.routing import param_groups

pytestmark = pytest.mark.skipif(
    not native.available(), reason="no native kernel here (needs x86-64 AVX2 and cc)"
)

SCALARS = (0.999, 0.1, 0.9, 0.99, 0.01, 1e-3, 1e-8, 0.7)  # the rule's scalars, RULE_FIELDS


def _case(shape, grad_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.1).bfloat16()
    w.view(-1)[:3] = torch.tensor([0.0, -0.0, 1.0 + 2**-7])
    c = (torch.randn(shape, generator=g) * 1e-4).bfloat16()
    grad = torch.randn(shape, generator=g).to(grad_dtype)
    m = torch.randn(shape, generator=g) * 0.01
    v = torch.rand(shape, generator=g) * 0.01
    return w, c, grad, m, v


def _fold(shape, folded):
    if not folded:
        return None
    rows = shape[0] if len(shape) > 1 else 1
    g = torch.Generator().manual_seed(1)
    return torch.rand(rows, generator=g) + 0.5, torch.rand(rows, generator=g) * 0.1


@pytest.mark.parametrize("shape", [(37, 29), (5,), (3, 8), (300, 257)])  # tails; > PIECE
@pytest.mark.parametrize("folded", [False, True], ids=["plain", "fold"])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32], ids=["g16", "g32"])
@pytest.mark.parametrize("precision", ["kahan", "nearest"])
def test_bf16_step_is_the_working_copy_path_bit_for_bit(shape, folded, grad_dtype, precision):
    w, c, grad, m, v = _case(shape, grad_dtype)
    fold = _fold(shape, folded)
    comp = c if precision == "kahan" else None
    # the path it replaces: working copy, the fp32 kernel, the write-back
    x = lowp.working_copy(w, comp)
    m_ref, v_ref = m.clone(), v.clone()
    native.step(x, grad.float(), m_ref, v_ref, SCALARS, fold, nesterov=True)
    w_ref, c_ref = w.clone(), None if comp is None else comp.clone()
    lowp.store_weight_(w_ref, x, precision, compensation=c_ref)
    # the fused pass
    w_new, c_new = w.clone(), None if comp is None else comp.clone()
    assert native.takes_bf16(w_new, grad, c_new)
    native.step(w_new, grad, m, v, SCALARS, fold, nesterov=True, compensation=c_new)
    assert torch.equal(w_new.view(torch.int16), w_ref.view(torch.int16))
    if comp is not None:
        assert torch.equal(c_new.view(torch.int16), c_ref.view(torch.int16))
    assert torch.equal(m, m_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("shape", [(37, 29), (4, 1024), (9,)])
def test_bf16_row_sums_count_the_compensation(shape):
    w, c, grad, _, _ = _case(shape, torch.bfloat16)
    want = native.row_sums(grad.float(), lowp.working_copy(w, c))
    assert torch.equal(native.row_sums(grad, w, c), want)
    assert torch.equal(native.row_sums(grad, w), native.row_sums(grad.float(), w.float()))


def test_non_finite_values_stay_non_finite():
    w, c, grad, m, v = _case((4, 16), torch.bfloat16)
    w[0, 0], grad[1, 1] = float("nan"), float("inf")
    native.step(w, grad, m, v, SCALARS, None, nesterov=True, compensation=c)
    assert w[0, 0].isnan() and not w[1, 1].isfinite()
    assert w[2:].isfinite().all()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(33, 64), torch.nn.GELU(), torch.nn.Linear(64, 17)]
    return torch.nn.Sequential(*layers).bfloat16()


def _train(native_weights: bool, **hyper) -> tuple[list[torch.Tensor], int]:
    model = _model()
    opt = shardflow.DolphinFlow(param_groups(model), lr=1e-2, **hyper)
    if not native_weights:
        opt._native_weight = lambda *args: False
    calls = 0
    original = native.step

    def counted(w, *args, **kwargs):
        nonlocal calls
        calls += w.dtype == torch.bfloat16
        return original(w, *args, **kwargs)

    torch.manual_seed(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "step", counted)
        for _ in range(4):
            model(torch.randn(8, 33).bfloat16()).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    state = [t for p in model.parameters() for t in opt.state[p].values()]
    return [p.detach() for p in model.parameters()] + state, calls


@pytest.mark.parametrize(
    "hyper",
    [
        {},
        {"precision": "nearest"},
        {"vector_mode": "flat", "nesterov": False},
        {"ortho_mode": None, "weight_decay": 0.1},
    ],
    ids=["kahan", "nearest", "flat", "elementwise"],
)
def test_dolphinflow_bf16_weights_take_the_fused_pass_with_the_same_result(hyper):
    fused, calls = _train(True, **hyper)
    reference, ref_calls = _train(False, **hyper)
    assert calls > 0 and ref_calls == 0  # the fused pass ran; the reference used working copies
    for a, b in zip(fused, reference):
        assert torch.equal(a, b)
