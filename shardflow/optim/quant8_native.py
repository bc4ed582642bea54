"""A native CPU kernel for the 8-bit state: quantize, dequantize, and DolphinFlow's fused step.

Why: in torch ops, requantizing a moment costs ~10 passes over memory and two table look-ups
per value (``index_select`` over a 65536-entry fp16-bits table, on one thread), and
``torch.compile`` does not help (inductor's CPU code loads uint8 and gathers table entries one
lane at a time: 3-15 ns per value, slower than eager; bench/results/dolphinflow8bit-cpu2-2026-11-23.md).
This module compiles a small C file (AVX2 intrinsics) with the system C compiler on first use
and calls it through :mod:`ctypes`; rows are split over torch's OpenMP threads.

**Nearest code without a search.** bitsandbytes' dynamic map (``create_dynamic_map``) is, per
exponent band ``i = 0..6`` (magnitudes ``[10^(i−7), 10^(i−6)]``), ``q = 2^i`` codes (signed
map; ``2^(i+1)`` unsigned) at the centres of ``q`` equal cells, mirrored for negative values
(signed), plus 0 and 1. For a normed value ``x`` the kernel finds the band by six comparisons
and the cell position ``p = (|x|·10^(6−i) − 0.1)·q/0.9 − ½`` (code ``k`` of the band at
``p = k``, so the midpoints inside the band at ``k + ½``); the code at or below ``|x|`` is
``⌊p⌋`` (−1: the code below the band). Whether to go one code up is decided on ``p`` against
the midpoint's position ``⌊p⌋ + ½``, or at the band's edges the positions (per band, from the
exact fp32 midpoints, :func:`band_constants`) of the midpoints to the previous band's last code
(or 0) and to the next band's first code (or 1). The arithmetic and the midpoints' own
roundings are off by < 10⁻⁴ of a cell; where ``p`` lies within 10⁻³ of a cell of the midpoint
(~0.2% of values) the kernel compares ``x`` itself with the exact fp32 midpoint ``T[c]``
between the candidate ``c`` and the next code (a 256-entry gather), as the table quantizer
does. So the codes are bitwise those of :func:`shardflow.optim.quant8._fp16_table`'s (checked
on every fp32 value in [−1, 1] by ``bench/quant8_native_exhaustive.py``, in the tests on every
value within ±300 ulps of every midpoint and code, and on random values over nine decades).
Values are divided by the block's absmax (IEEE division, as the torch path); NaN gives the
code of 0 and a NaN absmax, as there (a NaN absmax divides by 1, as there).

**The fused step** (:func:`step_rows`): per block of 256 (or 64) values of a row, dequantize
both moments (a gather from the 256-entry map times the block's scale), apply DolphinFlow's
element-wise rule in the order of DolphinFlow8bit's eager rule (``_eager_rule``: the same
operations, one rounding each, no fused multiply-add), keep the new moments in a 1 KiB
buffer and their absmax in registers, requantize: every value is read and written once, with
no fp32 copy of a moment in memory.

Measured on the shared 2-core CPU (one thread, 1536×576): quantize ≈1.2 ns per value (torch
path: 4.5–12; 2.0 with a midpoint gather for every value), dequantize ≈0.6 (1.4–1.7), the
whole fused step ≈3.6 ns per parameter (4.8 before the cell-position decision and the absmax
taken in the update pass; DolphinFlow's compiled element-wise pass: ≈1.0). Where the 3.6 go:
requantizing both moments ≈1.9 (the code arithmetic ≈1.4 of it), dequantizing, the rule and
memory ≈1.7.

Used when :func:`available`: an x86-64 CPU with AVX2 (``torch.backends.cpu``), a C compiler
(``$CC``, else ``cc``), and ``SHARDFLOW_NATIVE`` not set to ``0``. The library is built once per
source and flags into ``$SHARDFLOW_CACHE_DIR`` (default ``~/.cache/shardflow``), written under a
temporary name and renamed, so concurrent processes never load a partial file. Otherwise (or if
the build fails: one warning) the torch path runs, with the same codes. The building, caching,
loading and the link to torch's OpenMP runtime are :mod:`shardflow.optim._native`'s (shared
with :mod:`~shardflow.optim.factored_native`).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from shardflow.optim._native import I64 as _I64
from shardflow.optim._native import PTR as _PTR
from shardflow.optim._native import NativeLibrary
from shardflow.optim._native import ptr as _ptr

HEAD_BLOCK, TAIL_BLOCK = 256, 64  # as quant8 (not imported: quant8 imports this module)

_SOURCE = r"""
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define HEAD 256
#define TAIL 64
#define NEAR 1e-3f

typedef struct {           /* one dynamic map */
    float mult[8], off[8], base[8];  /* per band: cell floor(|x|*mult - off); base: code of cell 0 */
    float lo[8], hi[8];    /* per band: the midpoints below cell 0 and above the last, in cells */
    int32_t sgn;           /* signed map */
    const float* T;        /* 256 midpoints, T[c] between codes c and c+1; T[255] = inf */
    const float* map;      /* 256 code values */
} Map;

typedef struct {           /* DolphinFlow's element-wise rule, scalars as fp32 */
    float decay, one_minus_mu, beta2, one_minus_beta2, neg_scale, eps, c, mu;
    int32_t nesterov, decay_on;
} Rule;

/* the nearest code of 8 normed values (|x| <= 1, no NaN) */
static inline __attribute__((always_inline)) __m256i encode8(__m256 x, const Map* M, const int sgn) {
    static const float edges[6] = {1e-6f, 1e-5f, 1e-4f, 1e-3f, 1e-2f, 1e-1f};
    __m256 zero = _mm256_setzero_ps();
    __m256 a = sgn ? _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x) : _mm256_max_ps(x, zero);
    __m256i band = _mm256_setzero_si256();
    for (int e = 0; e < 6; e++)
        band = _mm256_sub_epi32(
            band, _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(edges[e]), _CMP_GE_OQ)));
#define BAND(t) _mm256_permutevar8x32_ps(_mm256_loadu_ps(M->t), band)
    __m256 pr = _mm256_sub_ps(_mm256_mul_ps(a, BAND(mult)), BAND(off));
    __m256 fl = _mm256_floor_ps(pr);
    /* the midpoint to the next code in cell units: fl + 1/2, or the band's edge midpoints */
    __m256 thr = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(fl, _mm256_set1_ps(0.5f)), BAND(lo)), BAND(hi));
    __m256 d = _mm256_sub_ps(pr, thr);
    __m256 up = _mm256_cmp_ps(d, zero, _CMP_GT_OQ);
    __m256 near = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), d), _mm256_set1_ps(NEAR), _CMP_LE_OQ);
    __m256 cand = _mm256_add_ps(fl, BAND(base));
#undef BAND
    if (sgn) {
        __m256 neg = _mm256_cmp_ps(x, zero, _CMP_LT_OQ);
        up = _mm256_xor_ps(up, neg);
        cand = _mm256_blendv_ps(cand, _mm256_sub_ps(_mm256_set1_ps(253.0f), cand), neg); /* -1 saturates to 0 */
    }
    __m256i c = _mm256_cvttps_epi32(cand);
    if (__builtin_expect(!_mm256_testz_ps(near, near), 0)) /* too close to call: the exact midpoint */
        up = _mm256_cmp_ps(x, _mm256_i32gather_ps(M->T, _mm256_max_epi32(c, _mm256_setzero_si256()), 4), _CMP_GT_OQ);
    return _mm256_sub_epi32(c, _mm256_castps_si256(up));
}

static inline __m256 decode8(const uint8_t* codes, const float* map, __m256 scale) {
    __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)codes));
    return _mm256_mul_ps(_mm256_i32gather_ps(map, c, 4), scale);
}

/* the largest of 8 lanes, or NaN if `nan` has a lane set */
static inline float hmax8(__m256 mx, __m256 nan) {
    float lanes[8], m = 0.0f;
    _mm256_storeu_ps(lanes, mx);
    for (int l = 0; l < 8; l++) m = lanes[l] > m ? lanes[l] : m;
    return _mm256_movemask_ps(nan) ? NAN : m;
}

/* the absmax of `size` (a multiple of 8) values, NaN if any value is */
static inline float block_absmax(const float* x, int size) {
    __m256 mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int j = 0; j < size; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    return hmax8(mx, nan);
}

/* the codes of a block of `size` values with absmax m */
static inline __attribute__((always_inline)) void encode_block(
    const float* x, int size, float m, uint8_t* codes, const Map* M, const int sgn) {
    __m256 s = _mm256_set1_ps(m > 0.0f ? m : 1.0f);
    int finite = m <= FLT_MAX;
    for (int j = 0; j < size; j += 16) { /* 16 codes: packed with saturation, 32 -> 16 -> 8 bits */
        __m256 y0 = _mm256_div_ps(_mm256_loadu_ps(x + j), s);
        __m256 y1 = _mm256_div_ps(_mm256_loadu_ps(x + j + 8), s);
        if (!finite) { /* NaN -> 0; a NaN absmax divides by 1: clamp to [-1, 1] (the end codes) */
            __m256 one = _mm256_set1_ps(1.0f), mone = _mm256_set1_ps(-1.0f);
            y0 = _mm256_min_ps(_mm256_max_ps(_mm256_and_ps(y0, _mm256_cmp_ps(y0, y0, _CMP_ORD_Q)), mone), one);
            y1 = _mm256_min_ps(_mm256_max_ps(_mm256_and_ps(y1, _mm256_cmp_ps(y1, y1, _CMP_ORD_Q)), mone), one);
        }
        __m256i c16 = _mm256_packus_epi32(encode8(y0, M, sgn), encode8(y1, M, sgn));
        __m256i c8 = _mm256_packus_epi16(c16, c16);
        _mm_storeu_si128((__m128i*)(codes + j), _mm256_castsi256_si128(
            _mm256_permutevar8x32_epi32(c8, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0))));
    }
}

/* block k of a row: head blocks of 256, then tail blocks of 64 */
static inline void block_at(int64_t k, int64_t head_blocks, int64_t* start, int* size) {
    if (k < head_blocks) { *start = k * HEAD; *size = HEAD; }
    else { *start = head_blocks * HEAD + (k - head_blocks) * TAIL; *size = TAIL; }
}

/* torch.lerp's formula (the weight is one scalar) */
static inline __m256 lerp8(__m256 self, __m256 end, float weight) {
    if (fabsf(weight) < 0.5f)
        return _mm256_add_ps(self, _mm256_mul_ps(_mm256_set1_ps(weight), _mm256_sub_ps(end, self)));
    return _mm256_sub_ps(end, _mm256_mul_ps(_mm256_sub_ps(end, self), _mm256_set1_ps(1.0f - weight)));
}

int32_t sf8_version(void) { return 2; }

/* weights and gradients are read 4 KiB ahead (a loop this busy keeps too few loads in flight
   to stream a matrix that is not in cache; as factored_native's) */
#define AHEAD 1024

void sf8_step_rows(int64_t r0, int64_t r1, float* w, const float* g, int64_t cols,
                   int64_t code_cols, int64_t head_blocks, int64_t blocks, uint8_t* mc, float* ms,
                   uint8_t* vc, float* vs, const float* fa, const float* fb, int64_t fold_stride,
                   const Rule* R, const Map* mm, const Map* vm) {
    __m256 beta2 = _mm256_set1_ps(R->beta2), omb2 = _mm256_set1_ps(R->one_minus_beta2);
    __m256 eps = _mm256_set1_ps(R->eps), decay = _mm256_set1_ps(R->decay);
    __m256 neg_scale = _mm256_set1_ps(R->neg_scale), c = _mm256_set1_ps(R->c);
    #pragma omp parallel for schedule(static) if ((r1 - r0) * cols >= PARALLEL_ELEMENTS)
    for (int64_t r = r0; r < r1; r++) {
        float mbuf[HEAD], vbuf[HEAD], wpad[TAIL], gpad[TAIL];
        float* wr = w + r * cols;
        const float* gr = g + r * cols;
        __m256 a = _mm256_set1_ps(fa ? fa[r * fold_stride] : 0.0f);
        __m256 b = _mm256_set1_ps(fb ? fb[r * fold_stride] : 0.0f);
        for (int64_t k = 0; k < blocks; k++) {
            int64_t start;
            int size;
            block_at(k, head_blocks, &start, &size);
            int n = cols - start < size ? (int)(cols - start) : size;
            float* wb = wr + start;
            const float* gb = gr + start;
            if (n < size) { /* a padded tail block: zeros past the row's end */
                memset(wpad, 0, sizeof wpad);
                memset(gpad, 0, sizeof gpad);
                memcpy(wpad, wb, n * sizeof(float));
                memcpy(gpad, gb, n * sizeof(float));
                wb = wpad;
                gb = gpad;
            }
            int64_t at = r * blocks + k;
            __m256 sm = _mm256_set1_ps(ms[at]), sv = _mm256_set1_ps(vs[at]);
            uint8_t* cm = mc + r * code_cols + start;
            uint8_t* cv = vc + r * code_cols + start;
            __m256 mmx = _mm256_setzero_ps(), vmx = mmx, nan = mmx;
            for (int j = 0; j < size; j += 8) {
                _mm_prefetch((const char*)(wr + start + j + AHEAD), _MM_HINT_T0);
                _mm_prefetch((const char*)(gr + start + j + AHEAD), _MM_HINT_T0);
                __m256 m = decode8(cm + j, mm->map, sm);
                __m256 v = decode8(cv + j, vm->map, sv);
                __m256 w0 = _mm256_loadu_ps(wb + j), g0 = _mm256_loadu_ps(gb + j);
                __m256 gg = fa ? _mm256_sub_ps(_mm256_mul_ps(g0, a), _mm256_mul_ps(b, w0))
                               : _mm256_mul_ps(g0, c);
                v = _mm256_add_ps(_mm256_mul_ps(v, beta2), _mm256_mul_ps(_mm256_mul_ps(omb2, gg), gg));
                m = lerp8(m, gg, R->one_minus_mu);
                __m256 n_ = R->nesterov ? lerp8(gg, m, R->mu) : m;
                __m256 denom = _mm256_add_ps(_mm256_sqrt_ps(v), eps);
                __m256 w1 = R->decay_on ? _mm256_mul_ps(w0, decay) : w0;
                _mm256_storeu_ps(wb + j, _mm256_add_ps(w1, _mm256_div_ps(_mm256_mul_ps(neg_scale, n_), denom)));
                _mm256_storeu_ps(mbuf + j, m);
                _mm256_storeu_ps(vbuf + j, v);
                mmx = _mm256_max_ps(mmx, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), m));
                vmx = _mm256_max_ps(vmx, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v));
                nan = _mm256_or_ps(nan, _mm256_cmp_ps(m, v, _CMP_UNORD_Q));
            }
            if (n < size) memcpy(wr + start, wpad, n * sizeof(float));
            int any_nan = _mm256_movemask_ps(nan);
            ms[at] = any_nan ? block_absmax(mbuf, size) : hmax8(mmx, nan);
            vs[at] = any_nan ? block_absmax(vbuf, size) : hmax8(vmx, nan);
            encode_block(mbuf, size, ms[at], cm, mm, 1);
            encode_block(vbuf, size, vs[at], cv, vm, 0);
        }
    }
}

void sf8_quantize_rows(int64_t r0, int64_t r1, const float* x, int64_t code_cols,
                       int64_t head_blocks, int64_t blocks, uint8_t* codes, float* absmax,
                       const Map* M) {
    #pragma omp parallel for schedule(static) if ((r1 - r0) * code_cols >= PARALLEL_ELEMENTS)
    for (int64_t r = r0; r < r1; r++)
        for (int64_t k = 0; k < blocks; k++) {
            int64_t start;
            int size;
            block_at(k, head_blocks, &start, &size);
            const float* xb = x + r * code_cols + start;
            float m = absmax[r * blocks + k] = block_absmax(xb, size);
            if (M->sgn) encode_block(xb, size, m, codes + r * code_cols + start, M, 1);
            else encode_block(xb, size, m, codes + r * code_cols + start, M, 0);
        }
}

void sf8_dequantize_rows(int64_t r0, int64_t r1, const uint8_t* codes, const float* absmax,
                         int64_t code_cols, int64_t head_blocks, int64_t blocks, float* out,
                         const Map* M) {
    #pragma omp parallel for schedule(static) if ((r1 - r0) * code_cols >= PARALLEL_ELEMENTS)
    for (int64_t r = r0; r < r1; r++)
        for (int64_t k = 0; k < blocks; k++) {
            int64_t start;
            int size;
            block_at(k, head_blocks, &start, &size);
            __m256 s = _mm256_set1_ps(absmax[r * blocks + k]);
            for (int j = 0; j < size; j += 8)
                _mm256_storeu_ps(out + r * code_cols + start + j,
                                 decode8(codes + r * code_cols + start + j, M->map, s));
        }
}
"""


class _Map(ctypes.Structure):
    _fields_ = [
        ("mult", ctypes.c_float * 8),
        ("off", ctypes.c_float * 8),
        ("base", ctypes.c_float * 8),
        ("lo", ctypes.c_float * 8),
        ("hi", ctypes.c_float * 8),
        ("sgn", ctypes.c_int32),
        ("T", ctypes.c_void_p),
        ("map", ctypes.c_void_p),
    ]


class _Rule(ctypes.Structure):
    _fields_ = [
        *(
            (name, ctypes.c_float)
            for name in (
                "decay",
                "one_minus_mu",
                "beta2",
                "one_minus_beta2",
                "neg_scale",
                "eps",
                "c",
                "mu",
            )
        ),
        ("nesterov", ctypes.c_int32),
        ("decay_on", ctypes.c_int32),
    ]


_SIGNATURES: dict[str, list[type]] = {
    # r0, r1, w, g, cols, code_cols, head_blocks, blocks, mc, ms, vc, vs, fa, fb, fold_stride,
    # rule, m map, v map
    "sf8_step_rows": [_I64, _I64, _PTR, _PTR, *[_I64] * 4, *[_PTR] * 6, _I64, *[_PTR] * 3],
    # r0, r1, x, code_cols, head_blocks, blocks, codes, absmax, map
    "sf8_quantize_rows": [_I64, _I64, _PTR, *[_I64] * 3, *[_PTR] * 3],
    # r0, r1, codes, absmax, code_cols, head_blocks, blocks, out, map
    "sf8_dequantize_rows": [_I64, _I64, _PTR, _PTR, *[_I64] * 3, _PTR, _PTR],
}


_library = NativeLibrary(
    "quant8",
    _SOURCE,
    _SIGNATURES,
    fallback="DolphinFlow8bit uses the torch path (slower, same codes)",
)
"""The compiled kernel (``_library()``: the ``ctypes.CDLL`` or None; see :mod:`._native`)."""


def available() -> bool:
    """Whether the native kernel can run here (built on first call)."""
    return _library() is not None


def thresholds(signed: bool) -> Tensor:
    """``(256,)`` fp32: ``T[c]``, the midpoint between codes ``c`` and ``c + 1`` of the dynamic
    map (computed in fp64, rounded to fp32 as the fp16-bits table's); ``T[255] = inf``."""
    from shardflow.optim.quant8 import dynamic_map  # noqa: PLC0415 (quant8 imports this module)

    code = dynamic_map(signed).double()
    mids = ((code[1:] + code[:-1]) / 2).float()
    return torch.cat([mids, torch.tensor([float("inf")])])


def band_constants(signed: bool) -> list[tuple[float, float, float, float, float]]:
    """Per exponent band ``i`` (``q`` codes): ``(mult, off, base, lo, hi)``. The cell position
    of a magnitude is ``|x|·mult − off`` (``mult = 10^(6−i)·q/0.9``, ``off = 0.1·q/0.9 + ½``):
    code ``k`` of the band at ``k``, its midpoints at ``k ± ½``; ``base``: the code of cell 0
    for ``x ≥ 0`` (``base_i + 127 − k`` for ``x < 0``: ``253 − (base + k)``); ``lo``, ``hi``: the
    positions of the midpoints to the code below the band (previous band's last, or 0) and to
    the code above it (next band's first, or 1), from :func:`thresholds` in fp64."""
    mids = thresholds(signed).double()
    out, first = [], 128 if signed else 1
    for i in range(7):
        q = 2 ** (i if signed else i + 1)
        mult, off = 10.0 ** (6 - i) * q / 0.9, 0.1 * q / 0.9 + 0.5
        lo, hi = (float(mids[c]) * mult - off for c in (first - 1, first + q - 1))
        out.append((mult, off, float(first), lo, hi))
        first += q
    return out


@functools.cache
def _map(signed: bool) -> tuple[_Map, tuple[Tensor, ...]]:
    """The ``Map`` struct of a dynamic map, and the tensors it points into (kept alive)."""
    from shardflow.optim.quant8 import dynamic_map  # noqa: PLC0415

    code = dynamic_map(signed).contiguous()
    mids = thresholds(signed).contiguous()
    m = _Map()
    for i, (mult, off, base, lo, hi) in enumerate(band_constants(signed)):
        m.mult[i], m.off[i], m.base[i], m.lo[i], m.hi[i] = mult, off, base, lo, hi
    m.sgn = int(signed)
    m.T, m.map = mids.data_ptr(), code.data_ptr()
    return m, (code, mids)


def usable(*tensors: Tensor) -> bool:
    """Whether the kernel takes these tensors: CPU, contiguous, fp32 (or uint8 codes)."""
    return available() and all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype in (torch.float32, torch.uint8)
        for t in tensors
    )


def quantize_rows(codes: Tensor, absmax: Tensor, x: Tensor, blocks, signed: bool) -> None:
    """Quantize ``x`` ``(rows, code_cols)`` fp32 (padded layout) into ``codes`` and
    ``absmax`` in place."""
    m = _map(signed)[0]
    _library().sf8_quantize_rows(
        0, x.shape[0], _ptr(x), blocks.code_cols, blocks.head_blocks, blocks.blocks,
        _ptr(codes), _ptr(absmax), ctypes.addressof(m),
    )  # fmt: skip


def dequantize_rows(codes: Tensor, absmax: Tensor, blocks, signed: bool, out: Tensor) -> None:
    """Write the fp32 values ``codes`` and ``absmax`` encode into ``out`` ``(rows,
    code_cols)``."""
    m = _map(signed)[0]
    _library().sf8_dequantize_rows(
        0, codes.shape[0], _ptr(codes), _ptr(absmax), blocks.code_cols, blocks.head_blocks,
        blocks.blocks, _ptr(out), ctypes.addressof(m),
    )  # fmt: skip


def step_rows(
    w: Tensor,
    g: Tensor,
    states: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    fold: tuple[Tensor, Tensor] | None,
    scalars: tuple[float, ...],
    blocks,
    *,
    nesterov: bool,
    decay_on: bool,
) -> None:
    """DolphinFlow's element-wise step on ``w`` ``(rows, cols)`` with gradient ``g`` and 8-bit
    moments ``states = ((m codes, m absmax), (v codes, v absmax))``, in place.

    ``scalars = (1 − lr·wd, 1 − μ, β₂, lr·√(1−β₂ᵗ)/W, eps·√(1−β₂ᵗ), c)`` as in DolphinFlow's
    fused pass; ``fold``: ⊥Grad's coefficients ``(a, b)`` (contiguous fp32), one per row or one
    for all rows, the gradient being ``a·g − b·w`` (else ``c·g``).
    """
    decay, one_minus_mu, beta2, scale, eps, c = scalars
    rule = _Rule(
        decay=decay,
        one_minus_mu=one_minus_mu,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        neg_scale=-scale,
        eps=eps,
        c=c,
        mu=1.0 - one_minus_mu,
        nesterov=int(nesterov),
        decay_on=int(decay_on),
    )
    (mc, ms), (vc, vs) = states
    fa, fb = (None, None) if fold is None else fold
    stride = 0 if fold is None or fold[0].numel() == 1 else 1
    mm, vm = _map(True)[0], _map(False)[0]
    rows, cols = w.shape
    _library().sf8_step_rows(
        0, rows, _ptr(w), _ptr(g), cols, blocks.code_cols, blocks.head_blocks, blocks.blocks,
        _ptr(mc), _ptr(ms), _ptr(vc), _ptr(vs), _ptr(fa), _ptr(fb), stride,
        ctypes.addressof(rule), ctypes.addressof(mm), ctypes.addressof(vm),
    )  # fmt: skip
