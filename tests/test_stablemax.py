"""StableMax cross-entropy: exact against a float64 reference, finite where softmax collapses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardflow.losses import log_stablemax_scores, stablemax, stablemax_cross_entropy


def _reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row loss straight from the definition, in float64: ``s(x) = x + 1`` (x ≥ 0), else
    ``1 / (1 − x)``; ``−log(s(x_y) / Σ s(x))``."""
    x = x.double()
    s = torch.where(x >= 0, x + 1, 1 / (1 - x))
    p = s / s.sum(-1, keepdim=True)
    return -p.gather(-1, y.unsqueeze(-1)).squeeze(-1).log()


def _data(n=24, c=11, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


def test_equals_the_float64_definition_for_every_reduction():
    x, y = _data()
    ref = _reference(x, y)
    torch.testing.assert_close(
        stablemax_cross_entropy(x, y, reduction="none"), ref, rtol=1e-13, atol=0
    )
    torch.testing.assert_close(
        stablemax_cross_entropy(x, y, reduction="sum"), ref.sum(), rtol=1e-13, atol=0
    )
    torch.testing.assert_close(stablemax_cross_entropy(x, y), ref.mean(), rtol=1e-13, atol=0)


def test_float32_agrees_with_the_float64_definition():
    x, y = _data(scale=30.0)
    got = stablemax_cross_entropy(x.float(), y, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(x.float(), y), rtol=2e-6, atol=2e-6)


def test_probabilities_are_s_over_its_sum():
    x, _ = _data(n=5, c=7)
    s = torch.where(x >= 0, x + 1, 1 / (1 - x))
    torch.testing.assert_close(stablemax(x), s / s.sum(-1, keepdim=True), rtol=1e-14, atol=0)


def test_ignore_index_and_mean_over_the_targets_kept():
    x, y = _data()
    y = y.clone()
    y[::3] = -100
    keep = y != -100
    ref = _reference(x[keep], y[keep])
    none = stablemax_cross_entropy(x, y, reduction="none")
    assert torch.equal(none[~keep], torch.zeros_like(none[~keep]))
    torch.testing.assert_close(none[keep], ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(stablemax_cross_entropy(x, y), ref.mean(), rtol=1e-13, atol=0)
    y[y == -100] = 7
    torch.testing.assert_close(
        stablemax_cross_entropy(x, y, ignore_index=7), _reference(x[y != 7], y[y != 7]).mean()
    )


def test_classes_on_dim_1_like_cross_entropy():
    """(N, C, T) logits with (N, T) targets, as F.cross_entropy takes sequences."""
    x, _ = _data(n=4 * 5, c=6)
    y = torch.randint(0, 6, (4, 5), generator=torch.Generator().manual_seed(3))
    seq = x.view(4, 5, 6).transpose(1, 2)  # (N, C, T)
    torch.testing.assert_close(
        stablemax_cross_entropy(seq, y, reduction="none"),
        _reference(x, y.flatten()).view(4, 5),
        rtol=1e-13,
        atol=0,
    )


def test_gradcheck_float64_across_zero():
    x, y = _data(n=6, c=5, scale=2.0)
    x[0, :3] = torch.tensor([0.0, -1.0, 1e-3])  # the branch point and x = -1 (log1p(-1) = -inf)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: stablemax_cross_entropy(t, y), (x,))
    assert torch.autograd.gradcheck(lambda t: stablemax_cross_entropy(t, y, reduction="none"), (x,))


def test_slope_of_log_s_is_one_over_one_plus_abs_x_even_at_0_and_minus_1():
    x = torch.tensor(
        [-1e4, -1.0, -0.5, 0.0, 0.5, 1.0, 1e4], dtype=torch.float64, requires_grad=True
    )
    log_stablemax_scores(x).sum().backward()
    torch.testing.assert_close(x.grad, 1 / (1 + x.detach().abs()), rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_loss_and_gradient_at_logits_of_1e4(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(0, 2, (8, 50), generator=g) * 2 - 1).to(torch.float64) * 1e4
    x[:, ::7] = torch.randn(8, 8, generator=g, dtype=torch.float64)  # some small ones too
    y = torch.randint(0, 50, (8,), generator=g)
    logits = x.to(dtype).requires_grad_(True)
    loss = stablemax_cross_entropy(logits, y)
    loss.backward()
    assert loss.dtype == dtype
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    ref = _reference(logits.detach().double(), y).mean()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the returned loss is rounded to bf16
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=0)


def test_no_softmax_collapse_where_float32_softmax_loses_its_gradient():
    """Correct-class logit 200 above the rest: float32 softmax gives p = 1 exactly, loss 0 and a
    zero gradient (Softmax Collapse: learning stops); StableMax keeps a loss and a gradient that
    still pushes the correct logit up and the others down."""
    x = torch.zeros(4, 10)
    y = torch.tensor([0, 3, 5, 9])
    x[torch.arange(4), y] = 200.0
    soft = x.clone().requires_grad_(True)
    softmax_loss = F.cross_entropy(soft, y)
    softmax_loss.backward()
    assert softmax_loss.item() == 0.0 and torch.count_nonzero(soft.grad) == 0  # collapsed

    stable = x.clone().requires_grad_(True)
    loss = stablemax_cross_entropy(stable, y)
    loss.backward()
    expected = torch.log(torch.tensor(210.0 / 201.0, dtype=torch.float64))  # (201 + 9·1) / 201
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    assert torch.isfinite(stable.grad).all()
    correct = stable.grad[torch.arange(4), y]
    assert (correct < 0).all()
    others = stable.grad.clone()
    others[torch.arange(4), y] = 0
    assert (others[others != 0] > 0).all() and torch.count_nonzero(others) == 4 * 9


def test_bad_reduction_and_integer_logits_say_what_to_pass():
    x, y = _data()
    with pytest.raises(ValueError, match="reduction='avg'.*'mean', 'sum' or 'none'"):
        stablemax_cross_entropy(x, y, reduction="avg")
    with pytest.raises(TypeError, match="logits has dtype torch.int64.*logits.float"):
        stablemax_cross_entropy(
            torch.ones(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long)
        )
