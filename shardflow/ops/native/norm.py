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
on the thread count. Built by :mod:`shardflow.ops.native.build` (AVX2; ``SHARDFLOW_NATIVE=0``
switches it off, and :func:`available` is then False: callers use torch's ops).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from shardflow.ops.native.build import FLAGS, I64, PTR, NativeLibrary

PIECE = 1 << 18
"""Values per piece: the unit of work of one thread, and of the fixed summation order."""

_SOURCE = rf"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define PIECE {PIECE}

static inline __m256d lo(__m256 x) {{ return _mm256_cvtps_pd(_mm256_castps256_ps128(x)); }}
static inline __m256d hi(__m256 x) {{ return _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)); }}

/* the squares of x[0..n) summed in fp64: four quarters read side by side, then the rest */
static double piece_sum(const float* x, int64_t n) {{
    int64_t q = n / 32 * 8;
    __m256d acc[8];
    for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_pd();
    for (int64_t i = 0; i < q; i += 8) {{
        for (int s = 0; s < 4; s++) {{
            __m256 v = _mm256_loadu_ps(x + s * q + i);
            acc[2 * s] = _mm256_fmadd_pd(lo(v), lo(v), acc[2 * s]);
            acc[2 * s + 1] = _mm256_fmadd_pd(hi(v), hi(v), acc[2 * s + 1]);
        }}
    }}
    for (int k = 1; k < 8; k++) acc[0] = _mm256_add_pd(acc[0], acc[k]);
    double l[4];
    _mm256_storeu_pd(l, acc[0]);
    double total = (l[0] + l[1]) + (l[2] + l[3]);
    for (int64_t i = 4 * q; i < n; i++) total += (double)x[i] * (double)x[i];
    return total;
}}

int32_t sfn_version(void) {{ return 1; }}

/* out[t] = the sum of squares of x[t][0..len[t]) */
void sfn_sum_sq(int64_t n, const float* const* x, const int64_t* len, double* out) {{
    int64_t pieces = 0;
    for (int64_t t = 0; t < n; t++) pieces += (len[t] + PIECE - 1) / PIECE;
    double* sums = (double*)malloc((pieces > 0 ? pieces : 1) * sizeof(double));
    int64_t* owner = (int64_t*)malloc((pieces > 0 ? pieces : 1) * sizeof(int64_t));
    int64_t* start = (int64_t*)malloc((pieces > 0 ? pieces : 1) * sizeof(int64_t));
    int64_t p = 0, numel = 0;
    for (int64_t t = 0; t < n; t++) {{
        numel += len[t];
        for (int64_t a = 0; a < len[t]; a += PIECE) {{ owner[p] = t; start[p++] = a; }}
    }}
    #pragma omp parallel for schedule(dynamic, 1) if (numel >= PARALLEL_ELEMENTS)
    for (int64_t k = 0; k < pieces; k++) {{
        int64_t t = owner[k], a = start[k];
        int64_t m = len[t] - a < PIECE ? len[t] - a : PIECE;
        sums[k] = piece_sum(x[t] + a, m);
    }}
    for (int64_t t = 0; t < n; t++) out[t] = 0.0;
    for (int64_t k = 0; k < pieces; k++) out[owner[k]] += sums[k];
    free(sums); free(owner); free(start);
}}
"""

_library = NativeLibrary(
    "norm",
    _SOURCE,
    {"sfn_sum_sq": [I64, PTR, PTR, PTR]},
    fallback="the gradient norm uses torch's ops (slower, the same to fp32 rounding)",
    flags=[*FLAGS, "-mfma"],
)
"""The compiled kernel (``_library()``: the ``ctypes.CDLL`` or None; see :mod:`._native`)."""


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
