"""The native Kahan load/store kernel (shardflow/ops/native/csrc/kahan.c) against the torch ops
of shardflow.ops.precision: the same bits, and the torch path where the kernel is off."""

from __future__ import annotations

import pytest
import torch
from native_fallback import check_off_switch_and_failed_build

from shardflow.ops import precision as lowp
from shardflow.ops.native import kahan as kahan_native

pytestmark = pytest.mark.skipif(
    not kahan_native.available(), reason="no native kernel here (needs x86-64 AVX2 and cc)"
)


def _values(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * torch.logspace(-30, 30, n)
    x[:4] = torch.tensor([0.0, -0.0, 1.0 + 2**-8, -(1.0 + 3 * 2**-9)])  # ties round to even
    return x


@pytest.mark.parametrize("n", [4, 7, 70_001])  # under and over the kernel's parallel threshold
def test_store_and_load_are_the_torch_bits(n):
    x = _values(n)
    w, c = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    kahan_native.store(x, w, c)
    want_w = x.to(torch.bfloat16)
    want_c = (x - want_w.float()).to(torch.bfloat16)
    assert torch.equal(w.view(torch.int16), want_w.view(torch.int16))
    assert torch.equal(c.view(torch.int16), want_c.view(torch.int16))
    assert torch.equal(kahan_native.load(w, c), w.float() + c.float())
    assert torch.equal(kahan_native.load(w, None), w.float())
    nearest = torch.empty_like(w)
    kahan_native.store(x, nearest, None)
    assert torch.equal(nearest, want_w)


def test_precision_uses_it_for_contiguous_bf16_only():
    w = torch.randn(6, 4).to(torch.bfloat16)
    assert kahan_native.usable(w, torch.zeros_like(w))
    assert not kahan_native.usable(w.t(), None)  # not contiguous: torch's ops
    assert not kahan_native.usable(w.half(), None)


def test_off_switch_and_a_failed_build_fall_back_to_torch(monkeypatch, tmp_path):
    x = _values(1000)

    def torch_path():
        w, c = torch.empty(1000, dtype=torch.bfloat16), torch.empty(1000, dtype=torch.bfloat16)
        lowp.store_weight_(w, x.clone(), "kahan", compensation=c)
        assert torch.equal(w, x.to(torch.bfloat16))
        assert torch.equal(lowp.working_copy(w, c), w.float() + c.float())

    check_off_switch_and_failed_build(monkeypatch, tmp_path, kahan_native._library, torch_path)
