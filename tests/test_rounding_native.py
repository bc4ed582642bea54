"""The native stochastic rounding kernel (:mod:`shardflow.ops.native.rounding`) gives the bits
of :func:`shardflow.ops.precision.bf16_stochastic`, and the factored optimizers use it."""

from __future__ import annotations

import pytest
import torch
from native_fallback import check_off_switch_and_failed_build

from shardflow.ops.native import rounding as rounding_native
from shardflow.ops.precision import bf16_stochastic, hash32_int, mix_seed
from shardflow.optim import factored

pytestmark = pytest.mark.skipif(
    rounding_native._library() is None, reason="no native kernel here (needs x86-64 AVX2 and cc)"
)

SPECIAL = [0.0, -0.0, 1.0, -1.0, 3.4e38, -3.4e38, 1e-40, -1e-45, float("inf"), float("-inf")]


def _values(n: int, gen: torch.Generator) -> torch.Tensor:
    x = (
        torch.randn(n, generator=gen)
        * torch.logspace(-30, 30, n).clamp_max(1e30)[torch.randperm(n, generator=gen)]
    )
    return torch.cat([x, torch.tensor(SPECIAL), torch.tensor([float("nan")])])


@pytest.mark.parametrize("offset", [0, 5, 2**32 - 3000])
def test_bits_equal_bf16_stochastic(offset):
    gen = torch.Generator().manual_seed(offset % 97)
    pieces, want = [], []
    for n, seed in [(0, 1), (1, 2), (7, 3), (1000, 4), (2049, 5)]:
        x = _values(n, gen)
        key = hash32_int(mix_seed(seed, 11))
        pieces.append((torch.empty(x.numel(), dtype=torch.bfloat16), x, key, offset))
        want.append(bf16_stochastic(x, key, offset))
    rounding_native.bf16_stochastic_many(pieces)
    for (dst, _, _, _), expected in zip(pieces, want):
        assert torch.equal(dst.view(torch.int16), expected.view(torch.int16))


def test_rounding_is_unbiased():
    """A value a third of the way between two bf16 neighbours rounds up a third of the time."""
    lo = torch.tensor(1.0).bfloat16().float()
    step = 2.0**-7
    x = torch.full((30_000,), float(lo) + step / 3)
    dst = torch.empty_like(x, dtype=torch.bfloat16)
    rounding_native.bf16_stochastic_many([(dst, x, hash32_int(7), 0)])
    up = (dst.float() > lo).float().mean().item()
    assert set(dst.float().unique().tolist()) == {float(lo), float(lo) + step}
    assert abs(up - 1 / 3) < 0.02


def test_factored_store_uses_the_kernel_with_the_same_bits(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    items = [
        (torch.empty(n, dtype=torch.bfloat16), torch.rand(n, generator=gen), seed, off)
        for n, seed, off in [(5, 1, 0), (300, 2, 40), (1, 3, 7)]
    ]
    calls = []
    kernel = rounding_native.bf16_stochastic_many
    monkeypatch.setattr(
        rounding_native, "bf16_stochastic_many", lambda p: calls.append(1) or kernel(p)
    )
    factored._store_bf16_many(items)
    native = [dst.clone() for dst, _, _, _ in items]
    monkeypatch.setattr(rounding_native, "usable", lambda *a: False)
    factored._store_bf16_many(items)
    assert calls == [1]
    for got, (dst, _, _, _) in zip(native, items):
        assert torch.equal(got.view(torch.int16), dst.view(torch.int16))


def test_off_switch_and_a_failed_build_fall_back_to_torch(monkeypatch, tmp_path):
    value = torch.rand(1000)
    dst = torch.empty(1000, dtype=torch.bfloat16)

    def store():  # the factored optimizers' batch, through torch's ops: the same bits
        factored._store_bf16_many([(dst, value, 5, 3)])
        want = bf16_stochastic(value, hash32_int(5), 3)
        assert torch.equal(dst.view(torch.int16), want.view(torch.int16))

    check_off_switch_and_failed_build(monkeypatch, tmp_path, rounding_native._library, store)
