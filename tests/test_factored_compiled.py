"""The compiled path of the factored optimizers (``compiled=True``) agrees with the eager path.

Tiny tensors, one or two compiled graphs per test (each costs a few seconds of compilation).

Tolerances: fp32 weights ``rtol=1e-5, atol=1e-6`` (as the AdamW equivalence test): inductor
contracts multiply-adds into FMAs and sums rows and columns in another order, a few ulps per
step. bf16 weights: the same stochastic-rounding streams are drawn, so the weights are equal
except where a few-ulp difference in the fp32 update tips a rounding: at most one bf16 ulp
(``2⁻⁷`` relative) on at most 5 % of the elements.
"""

from __future__ import annotations

import torch

from shardflow.optim import factored
from shardflow.optim.factored import FactoredAdam, FactoredAdopt, FactoredProdigy

FP32 = {"rtol": 1e-5, "atol": 1e-6}


def _run(cls, shapes, dtype, steps, **hyper):
    """Eager and compiled runs from the same weights and gradients; returns both weight lists
    and optimizers."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    runs = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = cls(params, compiled=compiled, **hyper)
        grads = torch.Generator().manual_seed(1)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads).to(dtype)
            opt.step()
        runs.append((params, opt))
    return runs


def test_compiled_adam_equals_eager_with_every_option_and_clipping():
    # (8, 16) compiles; (16,) is dense and (5, 3) has cols % 8 != 0: both stay eager
    (eager, e_opt), (comp, c_opt) = _run(
        FactoredAdam,
        [(8, 16), (16,), (5, 3)],
        torch.float32,
        steps=4,
        lr=1e-2,
        weight_decay=0.1,
        ademamix=True,
        ademamix_warmup=3,
        grams=True,
        gradient_clipping=1.0,  # the compiled pass folds the clip factor into the raw gradient
    )
    for a, b in zip(eager, comp):
        torch.testing.assert_close(b, a, **FP32)
    for key, value in e_opt.state[eager[0]].items():
        other = c_opt.state[comp[0]][key]
        if value.dtype == torch.uint8:
            assert (value != other).float().mean() <= 0.02, key  # signs of near-zero moments
        else:
            torch.testing.assert_close(other.float(), value.float(), rtol=1e-2, atol=1e-6)
    assert factored._COMPILED  # the compiled pass ran (it is built on first use)


def test_compiled_prodigy_and_adopt_on_bf16_weights_follow_eager():
    for cls, hyper in (
        (FactoredProdigy, {"lr": 1.0, "d0": 1e-2, "atan2": True}),  # d: a tensor scale
        (FactoredAdopt, {"lr": 1e-2, "weight_decay": 0.1}),  # first step: no update
    ):
        (eager, _), (comp, _) = _run(cls, [(4, 2, 8)], torch.bfloat16, steps=3, **hyper)
        a, b = eager[0].detach().float(), comp[0].detach().float()
        differ = ~torch.isclose(a, b, rtol=0, atol=0)
        assert differ.float().mean() <= 0.05, cls.__name__
        torch.testing.assert_close(b, a, rtol=2**-7, atol=0)
