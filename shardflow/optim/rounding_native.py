"""A native CPU kernel for stochastic rounding to bf16 of many small tensors in one call.

Why: the factored optimizers round every bf16 factor of a group at each step. In torch ops that
is one batch of ~15 ops (:func:`~shardflow.optim.precision.bf16_stochastic` over the
concatenated factors): ~0.35 ms a step on the CPU whatever the size, which on one 768×1024
matrix was a quarter of FactoredAdam's step (bench/results/factored-cpu-2026-11-23.md, Run 7).

The arithmetic is :func:`~shardflow.optim.precision.bf16_stochastic`'s, bit for bit: element
``i`` of a piece with key ``k`` and offset ``o`` adds the low 16 bits of ``lowbias32(((i + o)
mod 2³²) ^ k)`` to the fp32 bit pattern and keeps the upper 16 bits; a result that is NaN becomes
``0xFFFF``, the NaN torch's vectorized CPU conversion to bf16 writes. Built by
:mod:`shardflow.optim._native` (``SHARDFLOW_NATIVE=0`` switches it off: callers use torch).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from shardflow.optim._native import I64, PTR, NativeLibrary

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

typedef struct {
    uint16_t* dst;     /* bf16 bits */
    const float* src;
    int64_t n, offset;
    uint32_t key;
} Piece;

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

int32_t sfr_version(void) { return 1; }

void sfr_bf16_many(int64_t n, const Piece* pieces) {
    for (int64_t k = 0; k < n; k++) {
        const Piece* p = &pieces[k];
        for (int64_t i = 0; i < p->n; i++) {
            uint32_t bits;
            memcpy(&bits, &p->src[i], sizeof bits);
            uint32_t noise = lowbias32((uint32_t)(i + p->offset) ^ p->key) & 0xFFFFu;
            uint32_t r = (bits + noise) & 0xFFFF0000u;
            int nan = (r & 0x7F800000u) == 0x7F800000u && (r & 0x007F0000u) != 0;
            p->dst[i] = nan ? 0xFFFFu : (uint16_t)(r >> 16);
        }
    }
}
"""


class _Piece(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_void_p),
        ("src", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("offset", ctypes.c_int64),
        ("key", ctypes.c_uint32),
    ]


_library = NativeLibrary(
    "rounding",
    _SOURCE,
    {"sfr_bf16_many": [I64, PTR]},
    fallback="stochastic rounding uses torch's ops (slower, the same bits)",
)
"""The compiled kernel (``_library()``: the ``ctypes.CDLL`` or None; see :mod:`._native`)."""


def usable(dst: Tensor, value: Tensor) -> bool:
    """Whether the kernel writes ``dst`` (contiguous bf16) from ``value`` (contiguous fp32), both
    on the CPU with the same element count, where the kernel is available."""
    return (
        dst.device.type == "cpu"
        and value.device.type == "cpu"
        and dst.dtype == torch.bfloat16
        and value.dtype == torch.float32
        and dst.is_contiguous()
        and value.is_contiguous()
        and dst.numel() == value.numel()
        and _library() is not None
    )


def bf16_stochastic_many(pieces: list[tuple[Tensor, Tensor, int, int]]) -> None:
    """``dst ← bf16_stochastic(value, key, offset)`` for every ``(dst, value, key, offset)`` of
    ``pieces`` (each :func:`usable`; ``key = hash32_int(seed)``, ``offset + numel ≤ 2³²``)."""
    table = (_Piece * len(pieces))()
    for entry, (dst, value, key, offset) in zip(table, pieces):
        entry.dst, entry.src = dst.data_ptr(), value.data_ptr()
        entry.n, entry.offset, entry.key = value.numel(), offset, key
    _library().sfr_bf16_many(len(pieces), ctypes.addressof(table))
