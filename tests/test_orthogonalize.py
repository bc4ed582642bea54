"""The maths of orthogonalization: Newton-Schulz band and criterion, block mode, ⊥Grad."""

from __future__ import annotations

import math

import pytest
import torch

from shardflow.ops.orthogonalize import (
    NS_BAND,
    NS_TOL,
    block_newton_schulz,
    block_view,
    newton_schulz,
    newton_schulz_many,
    orthogonality_error,
    orthograd_,
    orthograd_sums,
)


def _svals(x):
    return torch.linalg.svdvals(x.double())


def _ill_conditioned(n, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (
        u @ torch.diag(torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)) @ v
    ).float()


MATRICES = {
    "gaussian-wide": lambda: torch.randn(48, 96, generator=torch.Generator().manual_seed(1)),
    "gaussian-tall": lambda: torch.randn(160, 40, generator=torch.Generator().manual_seed(2)),
    "gaussian-square": lambda: torch.randn(64, 64, generator=torch.Generator().manual_seed(3)),
    "ill-conditioned-1e3": lambda: _ill_conditioned(64, 1e3),
}


@pytest.mark.parametrize("name", MATRICES)
def test_singular_values_land_in_the_documented_band(name):
    x = MATRICES[name]()
    y = newton_schulz(x, min_steps=3, max_steps=12)
    s = _svals(y)
    assert orthogonality_error(y) <= NS_TOL + 0.05
    low, high = NS_BAND
    assert s.max() <= high
    assert (s >= low).double().mean() >= 0.95, f"only {(s >= low).double().mean():.2f} in band"


def test_adaptive_steps_stop_early_on_an_easy_matrix_and_go_on_for_a_hard_one():
    easy = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0]
    hard = _ill_conditioned(64, 1e3)
    calls = {"easy": 0, "hard": 0}
    for name, x in (("easy", easy), ("hard", hard)):
        for k in range(1, 13):
            if orthogonality_error(newton_schulz(x, min_steps=1, max_steps=k)) <= NS_TOL:
                calls[name] = k
                break
    assert calls["easy"] <= 2 < calls["hard"]
    adaptive = newton_schulz(hard, min_steps=1, max_steps=12)
    fixed = newton_schulz(hard, min_steps=calls["hard"], max_steps=calls["hard"])
    torch.testing.assert_close(adaptive, fixed)


def test_tall_matrices_are_transposed_and_match_the_wide_result():
    x = torch.randn(80, 30, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(newton_schulz(x), newton_schulz(x.T.contiguous()).T)


def test_batched_equals_one_by_one():
    mats = [torch.randn(20, 36, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    mats.append(torch.randn(36, 20, generator=torch.Generator().manual_seed(9)))
    fixed = dict(min_steps=5, max_steps=5)
    batched = newton_schulz_many(mats, **fixed)
    for m, b in zip(mats, batched):
        torch.testing.assert_close(b, newton_schulz(m, **fixed), rtol=1e-5, atol=1e-6)


def test_bf16_compute_stays_close_to_fp32():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    fixed = dict(min_steps=5, max_steps=5)
    ref = newton_schulz(x, **fixed)
    low = newton_schulz(x, dtype=torch.bfloat16, **fixed)
    assert low.dtype == x.dtype
    assert (low - ref).norm() / ref.norm() < 0.05


def test_zero_and_empty_matrices_give_zero():
    assert newton_schulz(torch.zeros(5, 7)).abs().max() == 0
    assert newton_schulz(torch.zeros(0, 7)).shape == (0, 7)


def test_block_mode_equals_newton_schulz_per_block_with_ragged_edges():
    x = torch.randn(50, 70, generator=torch.Generator().manual_seed(6))
    fixed = dict(min_steps=5, max_steps=5)
    out = block_newton_schulz(x, 32, **fixed)
    tiles = block_view(x, 32)
    assert len(tiles) == 2 * 3
    assert {(r.stop - r.start, c.stop - c.start) for r, c in tiles} == {
        (32, 32),
        (32, 6),
        (18, 32),
        (18, 6),
    }
    for r, c in tiles:
        torch.testing.assert_close(out[r, c], newton_schulz(x[r, c], **fixed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rowwise", [True, False])
def test_orthograd_removes_the_component_along_the_weight(rowwise):
    g = torch.randn(6, 10, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = orthograd_(g.clone(), w, rowwise=rowwise)
    if rowwise:
        torch.testing.assert_close(
            (out * w).sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0
        )
    else:
        assert abs((out * w).sum().item()) < 1e-12
        assert abs((out * w).sum(1)).max() > 1e-3  # flat does not zero each row


def test_orthograd_restores_the_norm_and_leaves_zero_weights_alone():
    g = torch.randn(4, 9, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    w = torch.randn(4, 9, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    w[2] = 0
    out = orthograd_(g.clone(), w, rowwise=True, restore_norm=True)
    torch.testing.assert_close(out.norm(dim=1), g.norm(dim=1))
    torch.testing.assert_close(out[2], g[2])
    flat = orthograd_(g.clone(), w, rowwise=False, restore_norm=True)
    torch.testing.assert_close(flat.norm(), g.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_gradient_parallel_to_its_weight_projects_to_zero_not_to_amplified_noise(dtype):
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(3, 576, generator=gen, dtype=dtype)
    g = torch.randn(3, 576, generator=gen, dtype=dtype)
    g[1] = 1e-3 * w[1]  # parallel: g⊥ is rounding noise, which restore_norm would scale to ‖g‖
    out = orthograd_(g.clone(), w, rowwise=True, restore_norm=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(out[keep].norm(dim=1), g[keep].norm(dim=1))


def test_orthograd_flattens_higher_dimensional_tensors_to_out_by_rest():
    g = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    w = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    out = orthograd_(g.clone(), w, rowwise=True)
    torch.testing.assert_close(
        (out * w).reshape(3, -1).sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_orthograd_with_summed_partials_equals_the_whole_tensor_result():
    """The sharded path: per-shard partial sums, added, give the unsharded projection."""
    g = torch.randn(8, 5, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    w = torch.randn(8, 5, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    whole = orthograd_(g.clone(), w, rowwise=False, restore_norm=True)
    sums = orthograd_sums(g[:3], w[:3], rowwise=False) + orthograd_sums(g[3:], w[3:], rowwise=False)
    top = orthograd_(g[:3].clone(), w[:3], rowwise=False, restore_norm=True, sums=sums)
    bottom = orthograd_(g[3:].clone(), w[3:], rowwise=False, restore_norm=True, sums=sums)
    torch.testing.assert_close(torch.cat([top, bottom]), whole)
