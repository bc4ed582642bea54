"""A native CPU kernel for the gradient-norm pass: ``‖g‖²`` of many fp32 tensors in one call.

Why: every ShardFlow step reads all gradients once for the global norm (clipping and the
NaN/inf check) before it updates anything. On the CPU that pass was a BLAS dot per tensor. On the
SmolLM2 embedding's gradient (28 M values) the dot reads 11.4 GB/s on one thread and 19.2 on two,
this kernel 19.4 and 27.1 (``python -m bench.kernels``, bench/results/kernels-cpu2-2026-11-23.md,
Run 3); on FactoredAdam's step the pass had been about a quarter of the time
(bench/results/factored-cpu-2026-11-23.md, Run 5).

The kernel cuts every tensor into pieces of :data:`PIECE` values, sums the squares of a piece in
fp64 (a product of two fp32 values is exact in fp64) over four streams (the piece's four
quarters, read side by side, two accumulators each), shares the pieces of all tensors among
torch's OpenMP threads, and adds each tensor's piece sums in order: the result does not depend
on the thread count. The kernel is the C file ``csrc/norm.c``, built by
:mod:`shardflow.ops.native.build` (AVX2 + FMA, ``-DPIECE`` from :data:`PIECE`;
``SHARDFLOW_NATIVE=0`` switches it off, and :func:`available` is then False: callers use
torch's ops).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from shardflow.ops.native.build import FLAGS, I64, PTR, NativeLibrary

PIECE = 1 << 18
"""Values per piece: the unit of work of one thread, and of the fixed summation order (the C
file's ``PIECE``, passed by the builder)."""

_library = NativeLibrary(
    "norm",
    "norm.c",
    {"sfn_sum_sq": [I64, PTR, PTR, PTR]},
    fallback="the gradient norm uses torch's ops (slower, the same to fp32 rounding)",
    flags=[*FLAGS, "-mfma"],
    defines={"PIECE": PIECE},
)
"""The compiled kernel (``_library()``: the ``ctypes.CDLL`` or None; see :mod:`.build`)."""


def available() -> bool:
    """Whether the native kernel can run here (built on first call)."""
    return _library() is not None


def usable(t: Tensor) -> bool:
    """Whether the kernel reads ``t``: a contiguous fp32 CPU tensor, where it is available."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and available()


def sq_norms(tensors: list[Tensor]) -> Tensor:
    """``‖t‖²`` of every tensor (each :func:`usable`), summed in fp64: a ``(len(tensors),)``
    float64 tensor."""
    n = len(tensors)
    out = torch.empty(n, dtype=torch.float64)
    if n:
        pointers = (ctypes.c_void_p * n)(*(t.data_ptr() for t in tensors))
        lengths = (ctypes.c_int64 * n)(*(t.numel() for t in tensors))
        _library().sfn_sum_sq(n, pointers, lengths, out.data_ptr())
    return out
