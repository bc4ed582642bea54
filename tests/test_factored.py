"""FactoredAdam / FactoredAdopt / FactoredProdigy on one process: signs, factorization, the
update rules against direct dense references, options, precision, memory, bad inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_factored_reference import Reference

from shardflow.ops.precision import add_stochastic_, random_bits, round_bf16_stochastic
from shardflow.optim.factored import (
    FactoredAdam,
    FactoredAdopt,
    FactoredProdigy,
    apply_signs_,
    factor_sums,
    pack_signs,
    reconstruct,
    unpack_signs,
)
from shardflow.optim.memory import estimate_state_footprint, state_footprint

CLASSES = {"adam": FactoredAdam, "adopt": FactoredAdopt, "prodigy": FactoredProdigy}
SHAPES = [(6, 5), (4, 3, 2), (7,), (1, 9)]


def _params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]


def _grads(params, step):
    """Gradients of ``½‖p − 1‖²`` plus noise: they pull towards 1, so Prodigy's d grows."""
    g = torch.Generator().manual_seed(100 + step)
    return [p.detach() - 1 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


# -- 1-bit signs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [0, 1, 3])
@pytest.mark.parametrize("cols", [0, 1, 5, 7, 8, 9, 15, 16, 17, 63, 64, 65])
def test_sign_packing_round_trips_for_every_size(rows, cols):
    negative = torch.rand(rows, cols, generator=torch.Generator().manual_seed(cols)) < 0.5
    packed = pack_signs(negative)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (cols + 7) // 8)
    torch.testing.assert_close(unpack_signs(packed, cols), negative, rtol=0, atol=0)
    if cols % 8 and rows:  # padding bits stay zero, so equal signs give equal bytes
        assert int((packed[:, -1] >> (cols % 8)).sum()) == 0
    magnitude = torch.rand(rows, cols, dtype=torch.float64)
    expected = torch.where(negative, -magnitude, magnitude)
    torch.testing.assert_close(apply_signs_(magnitude.clone(), packed), expected, rtol=0, atol=0)


def test_sign_bits_are_little_endian_within_each_byte():
    negative = torch.tensor([[True, False, False, True, False, False, False, False, True]])
    torch.testing.assert_close(pack_signs(negative), torch.tensor([[9, 1]], dtype=torch.uint8))


def test_unpacking_with_the_wrong_column_count_names_the_fix():
    with pytest.raises(ValueError, match=r"cannot hold cols=17: they need 3 bytes per row"):
        unpack_signs(torch.zeros(2, 2, dtype=torch.uint8), 17)


# -- rank-1 factorization ------------------------------------------------------------------------


def test_factorization_matches_the_dense_formula():
    torch.manual_seed(0)
    mag = torch.rand(6, 9, dtype=torch.float64)
    row, col = factor_sums(mag)
    torch.testing.assert_close(row, mag.sum(1), rtol=0, atol=0)
    dense = torch.einsum("i,j->ij", mag.sum(1), mag.sum(0)) / mag.sum()
    torch.testing.assert_close(reconstruct(row, col, torch.float64), dense, rtol=1e-14, atol=0)
    # a rank-1 matrix is reconstructed exactly, a row slice from its rows' factors
    r, c = torch.rand(6, dtype=torch.float64), torch.rand(9, dtype=torch.float64)
    rank1 = torch.outer(r, c)
    row, col = factor_sums(rank1)
    torch.testing.assert_close(reconstruct(row[2:4], col, torch.float64), rank1[2:4])
    zeros = reconstruct(torch.zeros(3), torch.zeros(4), torch.float32)
    assert torch.equal(zeros, torch.zeros(3, 4))


# -- the update rules against direct dense implementations --------------------------------------

OPTIONS = [
    {},
    {"ademamix": True, "ademamix_warmup": 3, "ademamix_alpha": 2.0, "ademamix_beta3": 0.99},
    {"atan2": True, "grams": True},
    {"orthograd": True, "weight_decay": 0.1},
]


def _hyper(kind, options):
    base = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}
    if kind == "adopt":
        base["eps"] = 1e-6
    if kind == "prodigy":
        base.update(lr=1.0, d0=1e-2, slice_p=2)
    return {**base, **options}


@pytest.mark.parametrize("factored", [False, True], ids=["dense", "factored"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("kind", ["adam", "adopt", "prodigy"])
def test_update_rule_matches_the_direct_dense_reference(kind, options, factored):
    hyper = _hyper(kind, options)
    params = _params()
    ref_params = [p.detach().clone() for p in params]
    ref = Reference(ref_params, kind, factored=factored, **hyper)
    opt = CLASSES[kind](params, factored=factored, **hyper)
    for step in range(6):
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)
    if kind == "prodigy":
        assert float(opt.state[params[0]]["d"]) == pytest.approx(ref.d, rel=1e-10)
        assert ref.d > hyper["d0"]  # the estimate moved, so the comparison covers it


def test_factored_false_adam_equals_torch_adamw_step_by_step():
    """fp32 tolerances as optimi's tests: atol 1e-6, rtol 1e-5."""
    hyper = {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}
    ours, theirs = _params(torch.float32), _params(torch.float32)
    opt = FactoredAdam(ours, factored=False, **hyper)
    ref = torch.optim.AdamW(theirs, foreach=False, **hyper)
    for step in range(12):
        for a, b, g in zip(ours, theirs, _grads(ours, step)):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_factored_state_is_what_was_promised():
    w = torch.nn.Parameter(torch.randn(5, 3, 4))
    b = torch.nn.Parameter(torch.randn(5))
    opt = FactoredAdam([w, b], ademamix=True)
    st = opt.state[w]
    assert st["exp_avg_row"].shape == (5,) and st["exp_avg_col"].shape == (12,)
    assert st["exp_avg_row"].dtype == torch.bfloat16
    assert st["exp_avg_sq_row"].dtype == st["exp_avg_slow_col"].dtype == torch.float32
    assert st["exp_avg_sign"].shape == st["exp_avg_slow_sign"].shape == (5, 2)
    assert "exp_avg" not in st
    assert opt.state[b]["exp_avg"].shape == (5,)  # 1-D: dense fp32
    for key in [*st, *opt.state[b]]:
        assert key in FactoredAdam.state_layout


def test_bf16_first_moment_factors_follow_the_fp64_run():
    """The only storage difference between fp32 and fp64 parameters is the first moment's
    factors (bf16 with stochastic rounding vs fp64): after 60 steps the weights agree to 2 % of
    the distance travelled."""
    torch.manual_seed(0)
    target = torch.randn(32, 48, dtype=torch.float64)
    runs = []
    for dtype in (torch.float32, torch.float64):
        w = torch.nn.Parameter(torch.zeros(32, 48, dtype=dtype))
        opt = FactoredAdam([w], lr=1e-2, weight_decay=0.0)
        for step in range(60):
            noise = torch.randn(32, 48, generator=torch.Generator().manual_seed(step))
            w.grad = (w.detach().double() - target + 0.3 * noise.double()).to(dtype)
            opt.step()
        runs.append(w.detach().double())
    travelled = runs[1].norm()
    assert (runs[0] - runs[1]).norm() < 0.02 * travelled


def test_adopt_first_step_only_initializes_the_second_moment():
    w = torch.nn.Parameter(torch.randn(4, 6))
    before = w.detach().clone()
    opt = FactoredAdopt([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.randn(4, 6)
    opt.step()
    assert torch.equal(w.detach(), before)
    row, col = opt.state[w]["exp_avg_sq_row"], opt.state[w]["exp_avg_sq_col"]
    torch.testing.assert_close(row, w.grad.square().sum(1))
    torch.testing.assert_close(col, w.grad.square().sum(0))


def test_prodigy_d_is_shared_by_the_group_and_survives_a_frozen_parameter():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(3))
    opt = FactoredProdigy([a, b], d0=1e-3)
    for step in range(4):
        a.grad = a.detach().clone()
        b.grad = b.detach().clone() if step < 2 else None
        opt.step()
    d_a, d_b = float(opt.state[a]["d"]), float(opt.state[b]["d"])
    assert d_a > d_b > 1e-3  # b's copy froze with b; a's is the group's
    b.grad, a.grad = b.detach().clone(), a.detach().clone()
    opt.step()
    assert float(opt.state[a]["d"]) == float(opt.state[b]["d"]) >= d_a


def test_prodigy_d_is_the_groups_also_for_a_parameter_back_from_frozen():
    """A frozen parameter's copy of ``d`` stays untouched (its whole state does); when it alone
    comes back (step 4), it moves with, and then carries, the group's current ``d``."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(3))
    opt = FactoredProdigy([a, b], d0=1e-3)
    for step in range(4):
        a.grad = a.detach().clone()
        b.grad = b.detach().clone() if step < 2 else None
        opt.step()
        if step == 1:
            frozen = float(opt.state[b]["d"])
    d_a, d_b = float(opt.state[a]["d"]), float(opt.state[b]["d"])
    assert d_a > d_b == frozen > 1e-3  # b's copy froze with b; a's is the group's
    a.grad, b.grad = None, b.detach().clone()
    opt.step()
    assert float(opt.state[b]["d"]) >= d_a  # from the group's d (the bug: from b's stale copy)
    assert float(opt.state[a]["d"]) == d_a  # a, now without a gradient, is untouched


# -- precision ----------------------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased_and_deterministic():
    x = torch.full((20000,), 1.0 + 2**-10, dtype=torch.float32)  # 1/8 of a bf16 ulp above 1
    rounded = round_bf16_stochastic(x, seed=7)
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=4e-5)
    assert torch.equal(rounded, round_bf16_stochastic(x, seed=7))
    assert not torch.equal(rounded, round_bf16_stochastic(x, seed=8))
    negative = round_bf16_stochastic(-x, seed=7)
    assert torch.equal(negative, -rounded)  # acts on the magnitude


def test_stochastic_rounding_does_not_depend_on_the_slice():
    x = torch.randn(10, 33)
    whole = round_bf16_stochastic(x, seed=3)
    part = round_bf16_stochastic(x[4:7], seed=3, offset=4 * 33)
    assert torch.equal(part, whole[4:7])
    big = random_bits(5, seed=1, offset=(1 << 32) - 2, device="cpu")
    assert torch.equal(big[:2], random_bits(2, seed=1, offset=(1 << 32) - 2, device="cpu"))
    assert int(big.min()) >= 0 and int(big.max()) < 1 << 32


def test_bf16_weights_keep_moving_under_tiny_updates_only_with_stochastic_rounding():
    p = torch.ones(4096, dtype=torch.bfloat16)
    nearest = p.clone()
    for step in range(100):
        update = torch.full((4096,), 1e-4)  # 1/78 of a bf16 ulp at 1.0
        add_stochastic_(p, update, -1.0, seed=step)
        nearest.add_(update.to(torch.bfloat16), alpha=-1.0)
    assert torch.equal(nearest, torch.ones_like(nearest))  # round to nearest: stuck
    assert p.float().mean().item() == pytest.approx(1 - 1e-2, abs=1e-3)


def test_bf16_parameters_train_with_every_variant():
    for cls in CLASSES.values():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 16).to(torch.bfloat16))
        target = torch.randn(8, 16)
        hyper = {"lr": 1.0, "d0": 1e-3} if cls is FactoredProdigy else {"lr": 1e-2}
        opt = cls([w], **hyper)
        first = None
        for _ in range(20):
            loss = (w.float() - target).square().mean()
            first = first or loss.item()
            w.grad = torch.autograd.grad(loss, w)[0]
            opt.step()
        assert (w.float() - target).square().mean().item() < 0.9 * first


# -- memory --------------------------------------------------------------------------------------


def test_state_bytes_per_param_on_a_768x1024_matrix():
    w = torch.nn.Parameter(torch.zeros(768, 1024))
    opt = FactoredAdam([w])
    expected = 768 * 128 + (768 + 1024) * 2 + (768 + 1024) * 4  # sign + bf16 m + fp32 v factors
    footprint = state_footprint(opt)
    assert footprint.state_bytes == expected == opt.state_bytes()
    assert footprint.bytes_per_param < 0.14  # adv_optm 2.5.16: 0.1432 on this shape
    meta = estimate_state_footprint(FactoredAdam, {"w": (768, 1024)})
    assert meta.state_bytes == expected and meta.by_key == footprint.by_key
    assert estimate_state_footprint(torch.optim.AdamW, [(768, 1024)]).bytes_per_param == 8.0
    dense = estimate_state_footprint(FactoredAdam, [(768, 1024)], factored=False)
    assert dense.bytes_per_param == 8.0


# -- checkpoints and bad inputs ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adam", "adopt", "prodigy"])
def test_state_dict_round_trip_keeps_dtypes_and_continues_exactly(kind):
    params = _params(torch.float32)
    opt = CLASSES[kind](params, ademamix=True, **_hyper(kind, {}))
    for step in range(3):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    saved, saved_params = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    twins = [p.clone().detach().requires_grad_() for p in saved_params]
    twin = CLASSES[kind](twins, ademamix=True, **_hyper(kind, {}))
    twin.load_state_dict(saved)
    for p, t in zip(params, twins):
        for key, value in opt.state[p].items():
            assert twin.state[t][key].dtype == value.dtype
    for step in range(3, 6):
        for p, t, g in zip(params, twins, _grads(params, step)):
            p.grad, t.grad = g, g.clone()
        opt.step()
        twin.step()
    for p, t in zip(params, twins):
        assert torch.equal(p, t)


def test_complex_parameters_are_refused_with_the_fix():
    z = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"complex64 \(complex\).*view_as_real"):
        FactoredAdam([z])


def test_prodigy_rejects_bad_hyperparameters_by_name():
    w = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match=r"growth_rate=0\.5 is invalid.*math\.inf"):
        FactoredProdigy(w, growth_rate=0.5)
    with pytest.raises(ValueError, match=r"slice_p=0 is invalid"):
        FactoredProdigy(w, slice_p=0)
    assert math.isinf(FactoredProdigy(w).defaults["growth_rate"])
