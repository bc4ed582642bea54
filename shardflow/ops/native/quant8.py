"""A native CPU kernel for the 8-bit state: quantize, dequantize, and DolphinFlow's fused step.

Why: in torch ops, requantizing a moment costs ~10 passes over memory and two table look-ups
per value (``index_select`` over a 65536-entry fp16-bits table, on one thread), and
``torch.compile`` does not help (inductor's CPU code loads uint8 and gathers table entries one
lane at a time: 3-15 ns per value, slower than eager; bench/results/dolphinflow8bit-cpu2-2026-11-23.md).
This module compiles a small C file (AVX2 or AVX-512 intrinsics) with the system C compiler on
first use and calls it through :mod:`ctypes`; rows are split over torch's OpenMP threads.

**Nearest code without a search.** bitsandbytes' dynamic map (``create_dynamic_map``) is, per
exponent band ``i = 0..6`` (magnitudes ``[10^(i−7), 10^(i−6)]``), ``q = 2^i`` codes (signed
map; ``2^(i+1)`` unsigned) at the centres of ``q`` equal cells, mirrored for negative values
(signed), plus 0 and 1. For a normed value ``x`` the kernel finds the band (six comparisons;
the AVX-512 builds: from the exponent bits) and the position ``p = (|x|·10^(6−i) − 0.1)·q/0.9 −
½ + base_i`` (code ``base_i + k`` of the band at ``p = base_i + k``, so the midpoints inside the
band at ``+ ½``); the code at or below ``|x|`` is ``p`` truncated (``p > 0``; ``253 −`` it for
``x < 0``). Whether to go one code up is decided on ``p`` against the midpoint's position
(the code ``+ ½``), or at the band's edges the positions (per band, from the exact fp32
midpoints, :func:`band_constants`) of the midpoints to the previous band's last code (or 0)
and to the next band's first code (or 1). The arithmetic and the midpoints' own roundings are
off by < 7·10⁻⁵ of a cell (midpoints' positions: ≤ 1.5·10⁻⁵, one fp32 ulp at 255; ``p``:
≤ 2.4·10⁻⁵; the AVX-512 builds' ``x·(1/s)``: ≤ 2.6·10⁻⁵; measured 2–5·10⁻⁵: a window narrower
than 5·10⁻⁵ starts to miss); where ``p`` lies within ``NEAR`` = 2·10⁻⁴ of a cell of the
midpoint (~0.04% of values) the kernel compares ``x`` itself with the exact fp32 midpoint
``T[c]`` between the candidate ``c`` and the next code (a 256-entry gather), as the table
quantizer does. So the codes are bitwise those of :func:`shardflow.ops.quant8._fp16_table`'s (checked
on every fp32 value in [−1, 1] by ``bench/quant8_native_exhaustive.py``, which also checks
quotients within ±300 ulps of every midpoint and code for 64 random block scales; in the tests
on every value within ±300 ulps of every midpoint and code, times four scales, and on random
values over nine decades). Values are divided by the block's absmax (IEEE division, as the
torch path; the AVX-512 builds multiply by its reciprocal and divide where near); NaN gives the
code of 0 and a NaN absmax, as there (a NaN absmax divides by 1, as there).

**The fused step** (:func:`step_rows`): per block of 256 (or 64) values of a row, dequantize
both moments (a gather from the 256-entry map times the block's scale), apply DolphinFlow's
element-wise rule in the order of DolphinFlow8bit's eager rule (``_eager_rule``: the same
operations, one rounding each, no fused multiply-add), keep the new moments in a 1 KiB
buffer and their absmax in registers, requantize: every value is read and written once, with
no fp32 copy of a moment in memory.

**Three builds** of the one source (:data:`ISA_FLAGS`, :func:`host_isas`; the loops are written
once over a vector type of ``W`` lanes):

- ``avx2`` (8 lanes): the band by six comparisons, the map and the rare midpoints by gathers.
- ``avx512`` (16 lanes; where torch itself dispatches to AVX-512): no gathers but near a
  midpoint — on the Ice Lake Xeon measured, the AVX2 build's two decode gathers take ≈1.9 of
  its ≈4.2 ns per parameter (``python -m bench.kernels``; Intel's 2023 GDS microcode is known to slow gathers on such
  cores; this VM's kernel reports "Not affected", so the cause is not confirmed). The band comes from the
  exponent bits of ``|x|`` (a 32-entry table of the band at the bottom of each binade 2⁻³¹..2⁰
  and the one band edge inside it, :func:`binade_band`: two register permutes and a compare);
  the band constants by register permutes; the map's 256 values by eight 32-entry permutes.
  Values are normed by ``x·(1/s)``, within 2 ulps of ``x/s`` (≤ 2.6·10⁻⁵ of a cell): only
  where that is too close to call (``NEAR``) the quotient ``x/s`` itself is compared with the
  midpoint, so the codes stay bitwise the torch path's (checked on quotients within ±300 ulps
  of every midpoint and code).
- ``avx512vbmi`` (the same, on CPUs with AVX-512 VBMI): 64 values decoded at once, each byte of
  their fp32 values by two 128-entry byte permutes (``vpermt2b``) from byte planes of the map.

Measured, one thread: on a 2-core AMD EPYC (Zen3, AVX2; 1536×576) quantize ≈1.2 ns per value
(torch path: 4.5–12), dequantize ≈0.6 (1.4–1.7), the fused step ≈3.6 ns per parameter
(DolphinFlow's compiled element-wise pass: ≈1.0; bench/results/dolphinflow8bit-cpu2-2026-11-23.md,
run 7); on a 2-core Ice Lake Xeon (49152×576, ``python -m bench.kernels``) the fused step takes
4.3 (avx2), 1.76 (avx512) and 1.48 (avx512vbmi) ns per parameter against 1.13 for DolphinFlow's
compiled pass (bench/results/dolphinflow8bit-icelake2-2026-12-06.md).

Used when :func:`available`: an x86-64 CPU with AVX2 (``torch.backends.cpu``), a C compiler
(``$CC``, else ``cc``), and ``SHARDFLOW_NATIVE`` not set to ``0``. The library is built once per
source and flags into ``$SHARDFLOW_CACHE_DIR`` (default ``~/.cache/shardflow``), written under a
temporary name and renamed, so concurrent processes never load a partial file. Where the
compiler cannot build the host's best build, the next one that builds is used
(:func:`host_library`, :func:`active_isa` tells which). Otherwise (or if no build succeeds: one
warning) the torch path runs, with the same codes. The building, caching,
loading and the link to torch's OpenMP runtime are :mod:`shardflow.ops.native.build`'s (shared
with :mod:`~shardflow.ops.native.factored`).
"""

from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path

import torch
from torch import Tensor

from shardflow.ops.native.build import FLAGS, NativeLibrary
from shardflow.ops.native.build import I64 as _I64
from shardflow.ops.native.build import PTR as _PTR
from shardflow.ops.native.build import ptr as _ptr

HEAD_BLOCK, TAIL_BLOCK = 256, 64  # as quant8 (not imported: quant8 imports this module)

_SOURCE = r"""
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define HEAD 256
#define TAIL 64
#define NEAR 2e-4f /* in cells: the arithmetic is off by < 7e-5 (module docstring) */

typedef struct {           /* one dynamic map */
    float mult[8], off[8]; /* per band: code floor(|x|*mult - off) (positions from the band's
                              base code, so the position of code c is c) */
    float lo[8], hi[8];    /* per band: the positions of the midpoints below its first code and
                              above its last */
    float edge[32];        /* per binade 2^e (at e + 31, e = -31..0): the band edge inside it, or inf */
    int32_t band_of[32];   /* per binade: the band at its bottom */
    uint8_t planes[4][256];/* byte p of code c's value at planes[p][c] (the AVX-512 VBMI decode) */
    int32_t sgn;           /* signed map */
    const float* T;        /* 256 midpoints, T[c] between codes c and c+1; T[255] = inf */
    const float* map;      /* 256 code values */
} Map;

typedef struct {           /* DolphinFlow's element-wise rule, scalars as fp32 */
    float decay, one_minus_mu, beta2, one_minus_beta2, neg_scale, eps, c, mu;
    int32_t nesterov, decay_on;
} Rule;

#ifdef __AVX512F__
/* ---- AVX-512: 16 lanes; every table look-up is a register permute (on the Ice Lake Xeon
   measured, the AVX2 build's two gathers per parameter cost more than its whole rule) ---- */
#define W 16
typedef __m512 vf;
typedef __mmask16 vnan;
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VSET _mm512_set1_ps
#define VADD _mm512_add_ps
#define VSUB _mm512_sub_ps
#define VMUL _mm512_mul_ps
#define VDIV _mm512_div_ps
#define VSQRT _mm512_sqrt_ps
#define VMAX _mm512_max_ps
#define VABS _mm512_abs_ps
#define NAN_NONE ((vnan)0)
#define NAN_OR(acc, a, b) ((vnan)((acc) | _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q)))
#define NAN_ANY(acc) ((acc) != 0)

static inline float hmax(vf mx) { return _mm512_reduce_max_ps(mx); }

/* values x (16 lanes) in [-1, 1] or NaN -> NaN to 0, clamped (a block with a NaN or inf absmax) */
static inline vf sanitize(vf y) {
    y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, y, _CMP_ORD_Q), y);
    return _mm512_min_ps(_mm512_max_ps(y, VSET(-1.0f)), VSET(1.0f));
}

/* a map's band and binade tables, in registers */
typedef struct {
    __m512 mult, off, lo, hi, edge0, edge1;
    __m512i band0, band1;
} Bands;

static inline Bands bands(const Map* M) {
    Bands t; /* lanes 8-15 of the band tables: never indexed */
    t.mult = _mm512_castps256_ps512(_mm256_loadu_ps(M->mult));
    t.off = _mm512_castps256_ps512(_mm256_loadu_ps(M->off));
    t.lo = _mm512_castps256_ps512(_mm256_loadu_ps(M->lo));
    t.hi = _mm512_castps256_ps512(_mm256_loadu_ps(M->hi));
    t.edge0 = VLOAD(M->edge);
    t.edge1 = VLOAD(M->edge + 16);
    t.band0 = _mm512_loadu_si512(M->band_of);
    t.band1 = _mm512_loadu_si512(M->band_of + 16);
    return t;
}

/* the nearest code of 16 normed values y (|y| <= 1 + 2 ulps, no NaN), as int32 (-1: code 0).
   Where a value is too close to a midpoint to call from y, the exact quotient x / s (y itself
   if `exact`) is compared with the exact fp32 midpoint. */
static inline __attribute__((always_inline)) __m512i encode16(
    __m512 y, __m512 x, __m512 s, const int exact, const Bands* t, const float* T, const int sgn) {
    __m512 a = sgn ? VABS(y) : VMAX(y, _mm512_setzero_ps()); /* +0 for -0 */
    /* the band: the one at the bottom of a's binade (its biased exponent 96..127 = binade
       2^-31..2^0, all below 2^-31 at 96), plus one past the binade's band edge */
    __m512i e = _mm512_max_epi32(_mm512_srli_epi32(_mm512_castps_si512(a), 23), _mm512_set1_epi32(96));
    __m512i band = _mm512_permutex2var_epi32(t->band0, e, t->band1); /* e's low 5 bits */
    __mmask16 past = _mm512_cmp_ps_mask(a, _mm512_permutex2var_ps(t->edge0, e, t->edge1), _CMP_GE_OQ);
    band = _mm512_mask_add_epi32(band, past, band, _mm512_set1_epi32(1));
#define BAND(f) _mm512_permutexvar_ps(band, t->f)
    __m512 pr = VSUB(VMUL(a, BAND(mult)), BAND(off)); /* > 0: truncation floors */
    __m512i c = _mm512_cvttps_epi32(pr);
    /* the midpoint to the next code: c + 1/2, or the band's edge midpoints */
    __m512 d = VSUB(pr, _mm512_min_ps(VMAX(VADD(_mm512_cvtepi32_ps(c), VSET(0.5f)), BAND(lo)), BAND(hi)));
#undef BAND
    /* d > 0 by its sign bit (d = 0 is near), and y < 0 by y's (-0 takes code 126 + 1, as +0) */
    __mmask16 up = ~_mm512_movepi32_mask(_mm512_castps_si512(d));
    __mmask16 near = _mm512_cmp_ps_mask(VABS(d), VSET(NEAR), _CMP_LE_OQ);
    if (sgn) { /* mirrored: code 253 - c, and up means down */
        __mmask16 neg = _mm512_movepi32_mask(_mm512_castps_si512(y));
        up ^= neg;
        c = _mm512_mask_sub_epi32(c, neg, _mm512_set1_epi32(253), c);
    }
    if (__builtin_expect(near != 0, 0)) { /* too close to call */
        __m512 ye = exact ? y : VDIV(x, s);
        __m512i at = _mm512_max_epi32(c, _mm512_setzero_si512());
        __mmask16 above = _mm512_mask_cmp_ps_mask(
            near, ye, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), near, at, T, 4), _CMP_GT_OQ);
        up = (up & ~near) | above;
    }
    return _mm512_mask_add_epi32(c, up, c, _mm512_set1_epi32(1));
}

/* 64 codes from four encode16 results, saturated to 0..255, in order */
static inline void store64(uint8_t* codes, __m512i c0, __m512i c1, __m512i c2, __m512i c3) {
    __m512i w = _mm512_packus_epi16(_mm512_packus_epi32(c0, c1), _mm512_packus_epi32(c2, c3));
    /* each 128-bit lane l holds dwords (c0, c1, c2, c3)[4l..4l+3]: gather each c's four */
    __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_si512(codes, _mm512_permutexvar_epi32(order, w));
}

#define RUN 64 /* values decoded at once */

#ifdef __AVX512VBMI__
/* 64 values of a map at 64 codes, into out[0..3]: each byte of the fp32 values by two 128-entry
   byte permutes (the table's halves, picked by the code's top bit), then interleaved. The
   codes are first reordered so that the interleave, which works within 128-bit lanes, puts
   the values back in order: out[j] lane l, value k comes from byte 16l + 4j + k. */
static inline void decode_run(const uint8_t* codes, const Map* M, vf scale, vf out[RUN / W]) {
    static const uint8_t order[64] = {
         0,  1,  2,  3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51,
         4,  5,  6,  7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
         8,  9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59,
        12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
    __m512i c = _mm512_permutexvar_epi8(_mm512_loadu_si512(order), _mm512_loadu_si512(codes));
    __mmask64 top = _mm512_movepi8_mask(c);
    __m512i b[4];
    for (int p = 0; p < 4; p++) {
        const uint8_t* t = M->planes[p];
        __m512i lo = _mm512_permutex2var_epi8(_mm512_loadu_si512(t), c, _mm512_loadu_si512(t + 64));
        __m512i hi = _mm512_permutex2var_epi8(_mm512_loadu_si512(t + 128), c, _mm512_loadu_si512(t + 192));
        b[p] = _mm512_mask_blend_epi8(top, lo, hi);
    }
    __m512i b01lo = _mm512_unpacklo_epi8(b[0], b[1]), b01hi = _mm512_unpackhi_epi8(b[0], b[1]);
    __m512i b23lo = _mm512_unpacklo_epi8(b[2], b[3]), b23hi = _mm512_unpackhi_epi8(b[2], b[3]);
    out[0] = VMUL(_mm512_castsi512_ps(_mm512_unpacklo_epi16(b01lo, b23lo)), scale);
    out[1] = VMUL(_mm512_castsi512_ps(_mm512_unpackhi_epi16(b01lo, b23lo)), scale);
    out[2] = VMUL(_mm512_castsi512_ps(_mm512_unpacklo_epi16(b01hi, b23hi)), scale);
    out[3] = VMUL(_mm512_castsi512_ps(_mm512_unpackhi_epi16(b01hi, b23hi)), scale);
}
#else
/* 16 values of a map at 16 codes: eight 32-entry permutes, picked by the codes' top 3 bits */
static inline vf decode(const uint8_t* codes, const float* map, vf scale) {
    __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)codes));
    __mmask16 b5 = _mm512_movepi32_mask(_mm512_slli_epi32(c, 26)); /* bits 5, 6, 7 */
    __mmask16 b6 = _mm512_movepi32_mask(_mm512_slli_epi32(c, 25));
    __mmask16 b7 = _mm512_movepi32_mask(_mm512_slli_epi32(c, 24));
    vf t[8];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_permutex2var_ps(VLOAD(map + 32 * i), c, VLOAD(map + 32 * i + 16));
    vf lo = _mm512_mask_mov_ps(_mm512_mask_mov_ps(t[0], b5, t[1]), b6, _mm512_mask_mov_ps(t[2], b5, t[3]));
    vf hi = _mm512_mask_mov_ps(_mm512_mask_mov_ps(t[4], b5, t[5]), b6, _mm512_mask_mov_ps(t[6], b5, t[7]));
    return VMUL(_mm512_mask_mov_ps(lo, b7, hi), scale);
}

static inline void decode_run(const uint8_t* codes, const Map* M, vf scale, vf out[RUN / W]) {
    for (int u = 0; u < RUN / W; u++) out[u] = decode(codes + u * W, M->map, scale);
}
#endif

/* the codes of a block of `size` (a multiple of 64) values with absmax m */
static inline __attribute__((always_inline)) void encode_block(
    const float* x, int size, float m, uint8_t* codes, const Map* M, const int sgn) {
    float s = m > 0.0f ? m : 1.0f;
    vf vs = VSET(s), r = VSET(1.0f / s);
    Bands t = bands(M);
    __m512i c[4];
    if (m <= FLT_MAX) { /* x * (1/s) is within 2 ulps of x / s: only near values need x / s */
        for (int j = 0; j < size; j += 4 * W) {
            for (int u = 0; u < 4; u++) {
                vf xj = VLOAD(x + j + u * W);
                c[u] = encode16(VMUL(xj, r), xj, vs, 0, &t, M->T, sgn);
            }
            store64(codes + j, c[0], c[1], c[2], c[3]);
        }
    } else { /* NaN -> 0; a NaN absmax divides by 1: clamp to [-1, 1] (the end codes) */
        for (int j = 0; j < size; j += 4 * W) {
            for (int u = 0; u < 4; u++) {
                vf y = sanitize(VDIV(VLOAD(x + j + u * W), vs));
                c[u] = encode16(y, y, vs, 1, &t, M->T, sgn);
            }
            store64(codes + j, c[0], c[1], c[2], c[3]);
        }
    }
}

#else
/* ---- AVX2: 8 lanes; the map through gathers ---- */
#define W 8
typedef __m256 vf;
typedef __m256 vnan;
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VSET _mm256_set1_ps
#define VADD _mm256_add_ps
#define VSUB _mm256_sub_ps
#define VMUL _mm256_mul_ps
#define VDIV _mm256_div_ps
#define VSQRT _mm256_sqrt_ps
#define VMAX _mm256_max_ps
#define VABS(v) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v)
#define NAN_NONE _mm256_setzero_ps()
#define NAN_OR(acc, a, b) _mm256_or_ps(acc, _mm256_cmp_ps(a, b, _CMP_UNORD_Q))
#define NAN_ANY(acc) (_mm256_movemask_ps(acc) != 0)

static inline float hmax(vf mx) {
    float lanes[8], m = 0.0f;
    _mm256_storeu_ps(lanes, mx);
    for (int l = 0; l < 8; l++) m = lanes[l] > m ? lanes[l] : m;
    return m;
}

/* the nearest code of 8 normed values (|x| <= 1, no NaN) */
static inline __attribute__((always_inline)) __m256i encode8(__m256 x, const Map* M, const int sgn) {
    static const float edges[6] = {1e-6f, 1e-5f, 1e-4f, 1e-3f, 1e-2f, 1e-1f};
    __m256 zero = _mm256_setzero_ps();
    __m256 a = sgn ? VABS(x) : _mm256_max_ps(x, zero);
    __m256i band = _mm256_setzero_si256();
    for (int e = 0; e < 6; e++)
        band = _mm256_sub_epi32(
            band, _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(edges[e]), _CMP_GE_OQ)));
#define BAND(t) _mm256_permutevar8x32_ps(_mm256_loadu_ps(M->t), band)
    __m256 pr = _mm256_sub_ps(_mm256_mul_ps(a, BAND(mult)), BAND(off)); /* >= 0: truncation floors */
    __m256i c = _mm256_cvttps_epi32(pr);
    /* the midpoint to the next code: c + 1/2, or the band's edge midpoints */
    __m256 thr = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(_mm256_cvtepi32_ps(c), _mm256_set1_ps(0.5f)), BAND(lo)), BAND(hi));
    __m256 d = _mm256_sub_ps(pr, thr);
    __m256 up = _mm256_cmp_ps(d, zero, _CMP_GT_OQ);
    __m256 near = _mm256_cmp_ps(VABS(d), _mm256_set1_ps(NEAR), _CMP_LE_OQ);
#undef BAND
    if (sgn) { /* mirrored: code 253 - c (-1 saturates to 0), and up means down */
        __m256 neg = _mm256_cmp_ps(x, zero, _CMP_LT_OQ);
        up = _mm256_xor_ps(up, neg);
        c = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(c),
            _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_set1_epi32(253), c)), neg));
    }
    if (__builtin_expect(!_mm256_testz_ps(near, near), 0)) /* too close to call: the exact midpoint */
        up = _mm256_cmp_ps(x, _mm256_i32gather_ps(M->T, _mm256_max_epi32(c, _mm256_setzero_si256()), 4), _CMP_GT_OQ);
    return _mm256_sub_epi32(c, _mm256_castps_si256(up));
}

static inline vf decode(const uint8_t* codes, const float* map, vf scale) {
    __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)codes));
    return _mm256_mul_ps(_mm256_i32gather_ps(map, c, 4), scale);
}

#define RUN 64 /* values decoded at once */

static inline void decode_run(const uint8_t* codes, const Map* M, vf scale, vf out[RUN / W]) {
    for (int u = 0; u < RUN / W; u++) out[u] = decode(codes + u * W, M->map, scale);
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
#endif

/* ---- both: the loops, in the vector type vf of W lanes ---- */

/* the absmax of `size` (a multiple of W) values, NaN if any value is */
static inline float block_absmax(const float* x, int size) {
    vf mx = VSET(0.0f);
    vnan nan = NAN_NONE;
    for (int j = 0; j < size; j += W) {
        vf v = VLOAD(x + j);
        mx = VMAX(mx, VABS(v));
        nan = NAN_OR(nan, v, v);
    }
    return NAN_ANY(nan) ? NAN : hmax(mx);
}

/* block k of a row: head blocks of 256, then tail blocks of 64 */
static inline void block_at(int64_t k, int64_t head_blocks, int64_t* start, int* size) {
    if (k < head_blocks) { *start = k * HEAD; *size = HEAD; }
    else { *start = head_blocks * HEAD + (k - head_blocks) * TAIL; *size = TAIL; }
}

/* torch.lerp's formula (the weight is one scalar) */
static inline vf lerp(vf self, vf end, float weight) {
    if (fabsf(weight) < 0.5f)
        return VADD(self, VMUL(VSET(weight), VSUB(end, self)));
    return VSUB(end, VMUL(VSUB(end, self), VSET(1.0f - weight)));
}

int32_t sf8_version(void) { return 3; }
int32_t sf8_lanes(void) { return W; }

/* weights and gradients are read 4 KiB ahead (a loop this busy keeps too few loads in flight
   to stream a matrix that is not in cache; as factored_native's) */
#define AHEAD 1024

void sf8_step_rows(int64_t r0, int64_t r1, float* w, const float* g, int64_t cols,
                   int64_t code_cols, int64_t head_blocks, int64_t blocks, uint8_t* mc, float* ms,
                   uint8_t* vc, float* vs, const float* fa, const float* fb, int64_t fold_stride,
                   const Rule* R, const Map* mm, const Map* vm) {
    vf beta2 = VSET(R->beta2), omb2 = VSET(R->one_minus_beta2);
    vf eps = VSET(R->eps), decay = VSET(R->decay);
    vf neg_scale = VSET(R->neg_scale), c = VSET(R->c);
    /* locals, not loads through R, mm, vm in the loop (a store to a float buffer may alias them) */
    const float one_minus_mu = R->one_minus_mu, mu = R->mu;
    const int nesterov = R->nesterov, decay_on = R->decay_on;
    #pragma omp parallel for schedule(static) if ((r1 - r0) * cols >= PARALLEL_ELEMENTS)
    for (int64_t r = r0; r < r1; r++) {
        float mbuf[HEAD], vbuf[HEAD], wpad[TAIL], gpad[TAIL];
        float* wr = w + r * cols;
        const float* gr = g + r * cols;
        vf a = VSET(fa ? fa[r * fold_stride] : 0.0f);
        vf b = VSET(fb ? fb[r * fold_stride] : 0.0f);
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
            vf sm = VSET(ms[at]), sv = VSET(vs[at]);
            uint8_t* cm = mc + r * code_cols + start;
            uint8_t* cv = vc + r * code_cols + start;
            vf mmx = VSET(0.0f), vmx = mmx;
            vnan nan = NAN_NONE;
            for (int i = 0; i < size; i += RUN) {
              vf mrun[RUN / W], vrun[RUN / W];
              decode_run(cm + i, mm, sm, mrun);
              decode_run(cv + i, vm, sv, vrun);
              for (int u = 0; u < RUN / W; u++) {
                int j = i + u * W;
                _mm_prefetch((const char*)(wr + start + j + AHEAD), _MM_HINT_T0);
                _mm_prefetch((const char*)(gr + start + j + AHEAD), _MM_HINT_T0);
                vf m = mrun[u], v = vrun[u];
                vf w0 = VLOAD(wb + j), g0 = VLOAD(gb + j);
                vf gg = fa ? VSUB(VMUL(g0, a), VMUL(b, w0)) : VMUL(g0, c);
                v = VADD(VMUL(v, beta2), VMUL(VMUL(omb2, gg), gg));
                m = lerp(m, gg, one_minus_mu);
                vf n_ = nesterov ? lerp(gg, m, mu) : m;
                vf denom = VADD(VSQRT(v), eps);
                vf w1 = decay_on ? VMUL(w0, decay) : w0;
                VSTORE(wb + j, VADD(w1, VDIV(VMUL(neg_scale, n_), denom)));
                VSTORE(mbuf + j, m);
                VSTORE(vbuf + j, v);
                mmx = VMAX(mmx, VABS(m));
                vmx = VMAX(vmx, VABS(v));
                nan = NAN_OR(nan, m, v);
              }
            }
            if (n < size) memcpy(wr + start, wpad, n * sizeof(float));
            int any_nan = NAN_ANY(nan);
            ms[at] = any_nan ? block_absmax(mbuf, size) : hmax(mmx);
            vs[at] = any_nan ? block_absmax(vbuf, size) : hmax(vmx);
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
            vf s = VSET(absmax[r * blocks + k]), run[RUN / W];
            for (int i = 0; i < size; i += RUN) {
                decode_run(codes + r * code_cols + start + i, M, s, run);
                for (int u = 0; u < RUN / W; u++) VSTORE(out + r * code_cols + start + i + u * W, run[u]);
            }
        }
}
"""


class _Map(ctypes.Structure):
    _fields_ = [
        ("mult", ctypes.c_float * 8),
        ("off", ctypes.c_float * 8),
        ("lo", ctypes.c_float * 8),
        ("hi", ctypes.c_float * 8),
        ("edge", ctypes.c_float * 32),
        ("band_of", ctypes.c_int32 * 32),
        ("planes", ctypes.c_uint8 * 1024),
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


ISA_FLAGS: dict[str, list[str]] = {
    "avx2": [],
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"],
    "avx512vbmi": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx512vbmi"],
}
"""The builds of the source, by instruction set, added to :data:`~shardflow.ops.native.build.FLAGS`:
AVX2 (8 lanes, the map through gathers), AVX-512 (16 lanes, every look-up a register permute),
AVX-512 VBMI (the same, values decoded by byte permutes)."""


def _kernel(isas: list[str]) -> NativeLibrary:
    """The kernel built for ``isas[0]``, else for the first of the others that builds."""
    return NativeLibrary(
        "quant8",
        _SOURCE,
        _SIGNATURES,
        fallback="DolphinFlow8bit uses the torch path (slower, same codes)",
        flags=[*FLAGS, *ISA_FLAGS[isas[0]]],
        alternatives=[[*FLAGS, *ISA_FLAGS[isa]] for isa in isas[1:]],
    )


@functools.cache
def library(isa: str) -> NativeLibrary:
    """The kernel built for ``isa`` (a key of :data:`ISA_FLAGS`)."""
    return _kernel([isa])


def host_isas() -> list[str]:
    """The builds this CPU runs, best last: AVX-512 where torch dispatches its own CPU kernels
    to it (``torch.backends.cpu``; ``ATEN_CPU_CAPABILITY=avx2`` turns both down), with VBMI
    where the CPU has it (``/proc/cpuinfo``)."""
    isas = ["avx2"]
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        isas.append("avx512")
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        if re.search(r"^flags\s*:.*\bavx512vbmi\b", flags, re.MULTILINE):
            isas.append("avx512vbmi")
    return isas


def host_library() -> NativeLibrary:
    """The kernel in the best build this CPU runs; where the compiler cannot build it (one too
    old for an instruction set), the next best that builds."""
    return _kernel(host_isas()[::-1])


_library = host_library()
"""The compiled kernel (``_library()``: the ``ctypes.CDLL`` or None; see :mod:`._native`)."""


def active_isa() -> str | None:
    """The build of the kernel in use (a key of :data:`ISA_FLAGS`), or None where the torch path
    runs."""
    if not available():
        return None
    built = set(_library.built_flags or ())
    return max(
        (isa for isa, flags in ISA_FLAGS.items() if built.issuperset(flags)),
        key=lambda isa: len(ISA_FLAGS[isa]),
    )


def available() -> bool:
    """Whether the native kernel can run here (built on first call)."""
    return _library() is not None


def thresholds(signed: bool) -> Tensor:
    """``(256,)`` fp32: ``T[c]``, the midpoint between codes ``c`` and ``c + 1`` of the dynamic
    map (computed in fp64, rounded to fp32 as the fp16-bits table's); ``T[255] = inf``."""
    from shardflow.ops.quant8 import dynamic_map  # noqa: PLC0415 (quant8 imports this module)

    code = dynamic_map(signed).double()
    mids = ((code[1:] + code[:-1]) / 2).float()
    return torch.cat([mids, torch.tensor([float("inf")])])


def band_constants(signed: bool) -> list[tuple[float, float, float, float]]:
    """Per exponent band ``i`` (``q`` codes from code ``base``): ``(mult, off, lo, hi)``. The
    position of a magnitude is ``|x|·mult − off`` (``mult = 10^(6−i)·q/0.9``, ``off = 0.1·q/0.9
    + ½ − base``): code ``base + k`` of the band at ``base + k``, its midpoints at ``± ½``, so
    the position truncated is the code at or below ``|x|`` (for ``x < 0``: ``253 −`` it);
    ``lo``, ``hi``: the positions of the midpoints to the code below the band (previous band's
    last, or 0) and to the code above it (next band's first, or 1), from :func:`thresholds` in
    fp64. (Positions reach 255.5, where an fp32 ulp is 1.5·10⁻⁵ of a cell.)"""
    mids = thresholds(signed).double()
    out, first = [], 128 if signed else 1
    for i in range(7):
        q = 2 ** (i if signed else i + 1)
        mult, off = 10.0 ** (6 - i) * q / 0.9, 0.1 * q / 0.9 + 0.5 - first
        lo, hi = (float(mids[c]) * mult - off for c in (first - 1, first + q - 1))
        out.append((mult, off, lo, hi))
        first += q
    return out


BAND_EDGES = torch.tensor([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]).tolist()
"""The lower edges of bands 1-6 of a normed magnitude, as fp32 values."""


def binade_band(e: int) -> tuple[int, float]:
    """For magnitudes in ``[2^e, 2^(e+1))`` (``e ≤ 0``; ``e = −31``: all below ``2^−30``): the band
    at ``2^e`` and the one band edge inside the binade (a band is wider than a binade), or inf.
    The AVX-512 kernel finds a band from the exponent by this table and one comparison."""
    bottom, top = 2.0**e, 2.0 ** (e + 1)
    inside = [edge for edge in BAND_EDGES if bottom < edge < top]
    return sum(edge <= bottom for edge in BAND_EDGES), (inside[0] if inside else float("inf"))


@functools.cache
def _map(signed: bool) -> tuple[_Map, tuple[Tensor, ...]]:
    """The ``Map`` struct of a dynamic map, and the tensors it points into (kept alive)."""
    from shardflow.ops.quant8 import dynamic_map  # noqa: PLC0415

    code = dynamic_map(signed).contiguous()
    mids = thresholds(signed).contiguous()
    m = _Map()
    for i, (mult, off, lo, hi) in enumerate(band_constants(signed)):
        m.mult[i], m.off[i], m.lo[i], m.hi[i] = mult, off, lo, hi
    for e in range(-31, 1):
        m.band_of[e + 31], m.edge[e + 31] = binade_band(e)
    m.sgn = int(signed)
    planes = code.view(torch.uint8).view(256, 4).t().contiguous()  # little-endian bytes
    ctypes.memmove(m.planes, planes.data_ptr(), 1024)
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
