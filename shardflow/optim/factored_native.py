"""A native CPU kernel for FactoredAdam's step: one pass over each factored matrix.

Why: the compiled pass (``compiled=True``) still makes ~5 passes over a matrix (~36 B per
element) plus ~0.3 ms of dynamo per call, and the eager path ~20: 4-9x fused AdamW on the CPU
(bench/results/factored-cpu-2026-11-23.md). Here one row loop does everything: per 8 columns
of a row it reconstructs ``m = ±r_m·c_m`` (sign from the packed bit) and ``v = r_v·c_v``,
applies Adam's rule, updates the weights, packs the new signs with one ``movemask``, and
accumulates the new row sums and the column partial sums of ``|m|`` and ``v``: the gradient
and the weights are read once, the weights written once, the signs read and written once
(≈12.25 B per element; fused AdamW moves 28).

**Arithmetic** (fp32, in the order of the torch path: :func:`~shardflow.optim.factored.
factored_chunk_update` with :func:`~shardflow.optim.factored.adam_direction` and
``_Factored._apply``):

    g ← g·grad_scale;  m ← r_m·c_m (sign flipped where the bit is set);  v ← r_v·c_v
    m ← fma(1−β₁, g − m, m)                     (torch.lerp's vectorized formula, weight < ½)
    v ← fma((1−β₂)·g, g, v·β₂)                  (addcmul's vectorized formula)
    u ← m / (√v·den_scale + den_eps)
    w ← fma(−lr, u, w·(1 − lr·wd))              (mul_, then add_ with alpha)

with ``c_m``, ``c_v`` the stored column factors divided by their sums in the kernel (summed in
8 lanes, so they may differ from ``factored._normalized``'s by an ulp), and the new signs, row
sums and column partial sums of ``|m|`` and ``v``. Row sums are summed
in 8 lanes then across them; column sums per block of ``block_rows`` rows, the blocks then added
in order: neither depends on the thread count (rows are split over threads on block
boundaries), but both differ from torch's reduction order by fp32 rounding (≈1e-7 relative).

Only FactoredAdam's plain rule (no AdEMAMix, atan2, Grams; ``scale = 1``), fp32 weights and
gradients, on contiguous matrices: everything else takes the torch path. Built and loaded by
:mod:`shardflow.optim._native` (AVX2 + FMA, ``SHARDFLOW_NATIVE=0`` switches it off).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from shardflow.optim._native import FLAGS, I64, PARALLEL_ELEMENTS, PTR, NativeLibrary, run_split

_SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <float.h>
#include <string.h>

typedef struct {
    float grad_scale, one_minus_beta1, beta2, one_minus_beta2, den_scale, den_eps, decay, neg_lr;
    int32_t decay_on;
} Rule;

int32_t sff_version(void) { return 1; }

static inline float bf16(uint16_t h) { /* a bf16 value as fp32 (exact) */
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* c / max(sum(c), FLT_MIN) (as factored._normalized; NaN stays NaN), summed in 8 lanes */
static void normalize(int64_t cols, const float* c, float* out) {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(c + j));
    float l[8], total = 0.0f;
    _mm256_storeu_ps(l, acc);
    total = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    for (; j < cols; j++) total += c[j];
    if (total < FLT_MIN) total = FLT_MIN;
    for (j = 0; j < cols; j++) out[j] = c[j] / total;
}

/* the normalized column factors: m's from bf16, v's from fp32 */
void sff_normalize(int64_t cols, const uint16_t* cm, const float* cv, float* cm_out,
                   float* cv_out) {
    for (int64_t j = 0; j < cols; j++) cm_out[j] = bf16(cm[j]);
    normalize(cols, cm_out, cm_out);
    normalize(cols, cv, cv_out);
}

/* 8 columns: returns the sign byte of the new m; updates w; adds |m| and v into the row
   accumulators and into the block's column partial sums. */
static inline uint8_t step8(float* w, const float* g, const float* cm, const float* cv,
                            uint8_t sign, __m256 rm, __m256 rv, const Rule* R,
                            __m256* row_m, __m256* row_v, float* pm, float* pv) {
    __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(sign), lane), lane);
    __m256 flip = _mm256_and_ps(_mm256_castsi256_ps(set), _mm256_set1_ps(-0.0f));
    __m256 m = _mm256_xor_ps(_mm256_mul_ps(rm, _mm256_loadu_ps(cm)), flip);
    __m256 v = _mm256_mul_ps(rv, _mm256_loadu_ps(cv));
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(g), _mm256_set1_ps(R->grad_scale));
    m = _mm256_fmadd_ps(_mm256_set1_ps(R->one_minus_beta1), _mm256_sub_ps(x, m), m);
    v = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(R->one_minus_beta2), x), x,
                        _mm256_mul_ps(v, _mm256_set1_ps(R->beta2)));
    __m256 den = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v), _mm256_set1_ps(R->den_scale)),
                               _mm256_set1_ps(R->den_eps));
    __m256 u = _mm256_div_ps(m, den);
    __m256 w0 = _mm256_loadu_ps(w);
    if (R->decay_on) w0 = _mm256_mul_ps(w0, _mm256_set1_ps(R->decay));
    _mm256_storeu_ps(w, _mm256_fmadd_ps(_mm256_set1_ps(R->neg_lr), u, w0));
    __m256 neg = _mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_LT_OQ);
    __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), m);
    *row_m = _mm256_add_ps(*row_m, a);
    *row_v = _mm256_add_ps(*row_v, v);
    _mm256_storeu_ps(pm, _mm256_add_ps(_mm256_loadu_ps(pm), a));
    _mm256_storeu_ps(pv, _mm256_add_ps(_mm256_loadu_ps(pv), v));
    return (uint8_t)_mm256_movemask_ps(neg);
}

static inline float hsum(__m256 x) {
    float l[8];
    _mm256_storeu_ps(l, x);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* blocks [b0, b1) of block_rows rows each (the last may be shorter) */
void sff_adam_blocks(int64_t b0, int64_t b1, int64_t block_rows, int64_t rows, int64_t cols,
                     float* w, const float* g, const uint16_t* rm, const float* rv,
                     const float* cm, const float* cv, uint8_t* signs, float* out_rm,
                     float* out_rv, float* part_m, float* part_v, const Rule* R) {
    int64_t nbytes = (cols + 7) / 8, full = cols / 8;
    float wp[8], gp[8], cmp[8], cvp[8], pmp[8], pvp[8];
    for (int64_t b = b0; b < b1; b++) {
        float* pm = part_m + b * cols;
        float* pv = part_v + b * cols;
        memset(pm, 0, cols * sizeof(float));
        memset(pv, 0, cols * sizeof(float));
        int64_t r1 = (b + 1) * block_rows < rows ? (b + 1) * block_rows : rows;
        for (int64_t r = b * block_rows; r < r1; r++) {
            float* wr = w + r * cols;
            const float* gr = g + r * cols;
            uint8_t* sr = signs + r * nbytes;
            __m256 vm = _mm256_set1_ps(bf16(rm[r])), vv = _mm256_set1_ps(rv[r]);
            __m256 row_m = _mm256_setzero_ps(), row_v = _mm256_setzero_ps();
            for (int64_t k = 0; k < full; k++) {
                int64_t j = 8 * k;
                sr[k] = step8(wr + j, gr + j, cm + j, cv + j, sr[k], vm, vv, R, &row_m, &row_v,
                              pm + j, pv + j);
            }
            if (full < nbytes) { /* a padded tail: zeros past the row's end */
                int64_t j = 8 * full, n = cols - j;
                memset(wp, 0, sizeof wp); memset(gp, 0, sizeof gp);
                memset(cmp, 0, sizeof cmp); memset(cvp, 0, sizeof cvp);
                memset(pmp, 0, sizeof pmp); memset(pvp, 0, sizeof pvp);
                memcpy(wp, wr + j, n * sizeof(float));
                memcpy(gp, gr + j, n * sizeof(float));
                memcpy(cmp, cm + j, n * sizeof(float));
                memcpy(cvp, cv + j, n * sizeof(float));
                memcpy(pmp, pm + j, n * sizeof(float));
                memcpy(pvp, pv + j, n * sizeof(float));
                sr[full] = step8(wp, gp, cmp, cvp, sr[full], vm, vv, R, &row_m, &row_v, pmp, pvp)
                           & (uint8_t)((1u << n) - 1u);
                memcpy(wr + j, wp, n * sizeof(float));
                memcpy(pm + j, pmp, n * sizeof(float));
                memcpy(pv + j, pvp, n * sizeof(float));
            }
            out_rm[r] = hsum(row_m);
            out_rv[r] = hsum(row_v);
        }
    }
}

/* out[k][j] = sum over blocks b, in order, of part[k][b][j] (moments k = 0, 1) */
void sff_sum_blocks(int64_t blocks, int64_t cols, const float* part, float* out) {
    for (int k = 0; k < 2; k++) {
        const float* pk = part + k * blocks * cols;
        float* ok = out + k * cols;
        for (int64_t j = 0; j < cols; j++) ok[j] = 0.0f;
        for (int64_t b = 0; b < blocks; b++)
            for (int64_t j = 0; j < cols; j++) ok[j] += pk[b * cols + j];
    }
}

/* the whole matrix on the calling thread: the normalized column factors (from the raw
   ones, cm_raw bf16 and cv_raw, into cm and cv), every block, then the column sums */
void sff_adam(int64_t blocks, int64_t block_rows, int64_t rows, int64_t cols, float* w,
              const float* g, const uint16_t* rm, const float* rv, float* cm,
              float* cv, uint8_t* signs, float* out_rm, float* out_rv, float* part_m,
              float* part_v, const Rule* R, float* sums, const uint16_t* cm_raw,
              const float* cv_raw) {
    sff_normalize(cols, cm_raw, cv_raw, cm, cv);
    sff_adam_blocks(0, blocks, block_rows, rows, cols, w, g, rm, rv, cm, cv, signs, out_rm,
                    out_rv, part_m, part_v, R);
    sff_sum_blocks(blocks, cols, part_m, sums);
}
"""


class _Rule(ctypes.Structure):
    _fields_ = [
        *(
            (name, ctypes.c_float)
            for name in (
                "grad_scale",
                "one_minus_beta1",
                "beta2",
                "one_minus_beta2",
                "den_scale",
                "den_eps",
                "decay",
                "neg_lr",
            )
        ),
        ("decay_on", ctypes.c_int32),
    ]


_SIGNATURES: dict[str, list[type]] = {
    # b0, b1, block_rows, rows, cols, w, g, rm, rv, cm, cv, signs, out_rm, out_rv, part_m,
    # part_v, rule
    "sff_adam_blocks": [*[I64] * 5, *[PTR] * 12],
    # blocks, cols, part (both moments), out (both moments)
    "sff_sum_blocks": [I64, I64, PTR, PTR],
    # blocks, then the arguments of sff_adam_blocks after b1, then sums
    "sff_adam": [*[I64] * 4, *[PTR] * 15],
    # cols, cm (bf16), cv, cm out, cv out
    "sff_normalize": [I64, *[PTR] * 4],
}

_library = NativeLibrary(
    "factored",
    _SOURCE,
    _SIGNATURES,
    fallback="FactoredAdam uses the torch path (slower, same results to fp32 rounding)",
    flags=[*FLAGS, "-mfma"],
)
"""The compiled kernel (``_library()``: the ``ctypes.CDLL`` or None; see :mod:`._native`)."""


def available() -> bool:
    """Whether the native kernel can run here (built on first call)."""
    return _library() is not None


MAX_BLOCKS = 32
"""Column partial sums are kept per block of rows: at most this many blocks per matrix."""
MIN_BLOCK_ROWS = 16


def block_rows(rows: int) -> int:
    """Rows per column-sum block: a function of ``rows`` only (never of the thread count)."""
    return max(MIN_BLOCK_ROWS, -(-rows // MAX_BLOCKS))


def adam_rows(
    w: Tensor,
    g: Tensor,
    row_factors: tuple[Tensor, Tensor],
    col_factors: tuple[Tensor, Tensor],
    signs: Tensor,
    scalars: tuple[float, ...],
    *,
    threads: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FactoredAdam's step on ``w`` ``(rows, cols)`` fp32 with gradient ``g`` (fp32, times
    ``grad_scale``), in place; ``signs`` ``(rows, ⌈cols/8⌉)`` uint8 updated in place.

    ``row_factors = (r_m, r_v)`` ``(rows,)`` and ``col_factors = (c_m, c_v)`` ``(cols,)``: the
    state's factors as stored (``|m|``'s bf16, ``v``'s fp32; the column factors are divided by
    their sums here, as ``factored._normalized`` does, summed in another order); ``scalars = (grad_scale, 1−β₁, β₂, den_scale, den_eps, 1 − lr·wd,
    lr)`` (``den_scale = bc₁/√bc₂``, ``den_eps = eps·bc₁`` as :class:`StepScalars`). Returns the
    new row sums of ``|m|`` and ``v`` and their column sums over these rows (all fp32).
    ``threads``: row blocks run on this many threads (default ``torch.get_num_threads()``).
    """
    grad_scale, omb1, beta2, den_scale, den_eps, decay, lr = scalars
    rule = _Rule(grad_scale, omb1, beta2, 1.0 - beta2, den_scale, den_eps, decay, -lr, decay != 1.0)
    rows, cols = w.shape
    per_block = block_rows(rows)
    blocks = -(-rows // per_block)
    # one buffer: row sums (m, v), column sums (m, v), normalized column factors (m, v), block
    # column partials (m, then v)
    buf = torch.empty(2 * rows + 4 * cols + 2 * blocks * cols, dtype=torch.float32)
    at = buf.data_ptr()
    out_rm, out_rv, sums = at, at + 4 * rows, at + 8 * rows
    cm, cv = sums + 8 * cols, sums + 12 * cols
    part_m = sums + 16 * cols
    part_v = part_m + 4 * blocks * cols
    rm, rv = row_factors
    cm_raw, cv_raw = col_factors
    args = (
        per_block, rows, cols, w.data_ptr(), g.data_ptr(), rm.data_ptr(), rv.data_ptr(), cm, cv,
        signs.data_ptr(), out_rm, out_rv, part_m, part_v, ctypes.addressof(rule),
    )  # fmt: skip
    lib = _library()
    n = min(torch.get_num_threads() if threads is None else threads, blocks)
    if n <= 1 or w.numel() < PARALLEL_ELEMENTS:
        lib.sff_adam(blocks, *args, sums, cm_raw.data_ptr(), cv_raw.data_ptr())
    else:
        lib.sff_normalize(cols, cm_raw.data_ptr(), cv_raw.data_ptr(), cm, cv)
        run_split(
            [blocks * i // n for i in range(n + 1)],
            lambda b0, b1: lib.sff_adam_blocks(b0, b1, *args),
        )
        lib.sff_sum_blocks(blocks, cols, part_m, sums)
    r, c = 2 * rows, 2 * rows + cols
    return buf[:rows], buf[rows:r], buf[r:c], buf[c : c + cols]


def usable(w: Tensor, g: Tensor) -> bool:
    """Whether the kernel takes this matrix: CPU, contiguous, fp32 weights and gradient."""
    return (
        available()
        and w.device.type == "cpu"
        and g.device.type == "cpu"
        and w.dtype == torch.float32
        and g.dtype == torch.float32
        and w.is_contiguous()
        and g.is_contiguous()
    )
