"""A native CPU kernel for stochastic rounding to bf16 of many small tensors in one call.

Why: the factored optimizers round every bf16 factor of a group at each step. In torch ops that
is one batch of ~15 ops over the concatenated factors (:func:`~shardflow.ops.precision.
bf16_stochastic`): 9.7–16.6 ms a step for SmolLM2-135M's 355 k factor values on the CPU, against
2.1–2.2 ms here, ~1.3 of them Python (``python -m bench.kernels``,
bench/results/kernels-cpu2-2026-11-23.md, Run 3).

The arithmetic is :func:`~shardflow.ops.precision.bf16_stochastic`'s, bit for bit: element
``i`` of a piece with key ``k`` and offset ``o`` adds the low 16 bits of ``lowbias32(((i + o)
mod 2³²) ^ k)`` to the fp32 bit pattern and keeps the upper 16 bits; a result that is NaN becomes
``0xFFFF``, the NaN torch's vectorized CPU conversion to bf16 writes. The kernel is the C file
``csrc/rounding.c``, built by :mod:`shardflow.ops.native.build` (``SHARDFLOW_NATIVE=0``
switches it off: callers use torch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from shardflow.ops.native.build import I64, PTR, NativeLibrary

_library = NativeLibrary(
    "rounding",
    "rounding.c",
    {"sfr_bf16_many": [I64, PTR]},
    fallback="stochastic rounding uses torch's ops (slower, the same bits)",
)
"""The compiled kernel (``_library()``: the ``ctypes.CDLL`` or None; see :mod:`.build`)."""


def usable(pieces: list[tuple[Tensor, Tensor, int, int]]) -> bool:
    """Whether the kernel takes every ``(dst, value, key, offset)`` of ``pieces``: ``dst``
    contiguous bf16, ``value`` contiguous fp32 of the same size, both on the CPU, where the
    kernel is available."""
    return _library() is not None and all(
        dst.dtype == torch.bfloat16
        and value.dtype == torch.float32
        and dst.device.type == "cpu"
        and value.device.type == "cpu"
        and dst.is_contiguous()
        and value.is_contiguous()
        and dst.numel() == value.numel()
        for dst, value, _, _ in pieces
    )


def bf16_stochastic_many(pieces: list[tuple[Tensor, Tensor, int, int]]) -> None:
    """``dst ← bf16_stochastic(value, key, offset)`` for every ``(dst, value, key, offset)`` of
    ``pieces`` (:func:`usable`; ``key = hash32_int(seed)``, ``offset + numel ≤ 2³²``)."""
    # the C struct Piece as 5 int64 each: pointers, n, offset, then the key in the low 4 bytes
    table = torch.tensor(
        [(d.data_ptr(), v.data_ptr(), v.numel(), off, key) for d, v, key, off in pieces],
        dtype=torch.int64,
    )
    _library().sfr_bf16_many(len(pieces), table.data_ptr())
