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
(signed), plus 0 and 1. For a normed value ``x`` the kernel computes arithmetically the code at
or just below ``|x|`` — band from six comparisons, cell ``⌊(|x|·10^(6−i) − 0.1)·q/0.9 − ½⌋``
(the cell boundaries are the midpoints between the codes of a band; a cell index of −1 is the
previous band's last code, so band edges need no special case) — and then compares ``x`` with
the exact fp32 midpoint ``T[c]`` between that code ``c`` and the next: code ``c + (x > T[c])``.
The arithmetic candidate only has to be ``c_true`` or ``c_true − 1``, which holds for any
rounding error below half a cell (an error can only move it where ``x`` is near a code, whose
midpoints are half a cell away), so the result is decided by the same fp32 comparison with the
same midpoints as :func:`shardflow.optim.quant8._fp16_table`'s: the codes are bitwise those of
the table quantizer (tested on every fp32 value within ±300 ulps of every midpoint and code,
and on random values over nine decades). Values are divided by the block's absmax (IEEE
division, as the torch path), NaN gives the code of 0 and a NaN absmax, as there.

**The fused step** (:func:`step_rows`): per block of 256 (or 64) values of a row, dequantize
both moments (a gather from the 256-entry map times the block's scale), apply DolphinFlow's
element-wise rule in the order of DolphinFlow8bit's eager rule (``_eager_rule``: the same
operations, one rounding each, no fused multiply-add), keep the new moments in a 1 KiB
buffer, take their absmax, requantize: every value is read and written once, with no fp32 copy
of a moment in memory.

Measured on the shared 2-core CPU (one thread, 1536×576): quantize ≈1.5 ns per value (torch
path: 4.5–12), dequantize ≈0.5 (1.4–1.7), the whole fused step ≈6.6 ns per parameter
(DolphinFlow's compiled element-wise pass: ≈1.0).

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
#include <math.h>
#include <stdint.h>
#include <string.h>

#define HEAD 256
#define TAIL 64

typedef struct {           /* one dynamic map */
    float mult[8], off[8], base[8];  /* per band: cell = floor(|x|*mult - off) + base */
    float pmax;            /* last magnitude index below 1.0 */
    int32_t sgn;           /* signed map */
    const float* T;        /* 256 midpoints, T[c] between codes c and c+1; T[255] = inf */
    const float* map;      /* 256 code values */
} Map;

typedef struct {           /* DolphinFlow's element-wise rule, scalars as fp32 */
    float decay, one_minus_mu, beta2, one_minus_beta2, neg_scale, eps, c, mu;
    int32_t nesterov, decay_on;
} Rule;

/* the nearest code of 8 normed values (|x| <= 1; NaN -> the code of 0) */
static inline __m128i encode8(__m256 x, const Map* M) {
    static const float edges[6] = {1e-6f, 1e-5f, 1e-4f, 1e-3f, 1e-2f, 1e-1f};
    __m256 zero = _mm256_setzero_ps();
    x = _mm256_and_ps(x, _mm256_cmp_ps(x, x, _CMP_ORD_Q));
    __m256 a = M->sgn ? _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x) : _mm256_max_ps(x, zero);
    __m256i band = _mm256_setzero_si256();
    for (int e = 0; e < 6; e++)
        band = _mm256_sub_epi32(
            band, _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(edges[e]), _CMP_GE_OQ)));
    __m256 mult = _mm256_permutevar8x32_ps(_mm256_loadu_ps(M->mult), band);
    __m256 off = _mm256_permutevar8x32_ps(_mm256_loadu_ps(M->off), band);
    __m256 base = _mm256_permutevar8x32_ps(_mm256_loadu_ps(M->base), band);
    __m256 p = _mm256_add_ps(_mm256_floor_ps(_mm256_sub_ps(_mm256_mul_ps(a, mult), off)), base);
    p = _mm256_min_ps(_mm256_max_ps(p, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(M->pmax));
    __m256 cand;
    if (M->sgn) {
        __m256 neg = _mm256_max_ps(_mm256_sub_ps(_mm256_set1_ps(125.0f), p), zero);
        __m256 pos = _mm256_add_ps(_mm256_set1_ps(128.0f), p);
        cand = _mm256_blendv_ps(pos, neg, _mm256_cmp_ps(x, zero, _CMP_LT_OQ));
    } else {
        cand = _mm256_add_ps(_mm256_set1_ps(1.0f), p);
    }
    __m256i c = _mm256_cvttps_epi32(cand);
    __m256 t = _mm256_i32gather_ps(M->T, c, 4);
    c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(x, t, _CMP_GT_OQ)));
    __m128i c16 = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    return _mm_packus_epi16(c16, c16);
}

static inline __m256 decode8(const uint8_t* codes, const float* map, __m256 scale) {
    __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)codes));
    return _mm256_mul_ps(_mm256_i32gather_ps(map, c, 4), scale);
}

/* one block of `size` (a multiple of 8) values: its absmax (NaN if any value is) and codes */
static void quantize_block(const float* x, int size, uint8_t* codes, float* absmax,
                           const Map* M) {
    __m256 mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int j = 0; j < size; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8], m = 0.0f;
    _mm256_storeu_ps(lanes, mx);
    for (int l = 0; l < 8; l++) m = lanes[l] > m ? lanes[l] : m;
    if (_mm256_movemask_ps(nan)) m = NAN;
    *absmax = m;
    __m256 s = _mm256_set1_ps(m > 0.0f ? m : 1.0f);
    for (int j = 0; j < size; j += 8)
        _mm_storel_epi64((__m128i*)(codes + j),
                         encode8(_mm256_div_ps(_mm256_loadu_ps(x + j), s), M));
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

int32_t sf8_version(void) { return 1; }

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
            for (int j = 0; j < size; j += 8) {
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
            }
            if (n < size) memcpy(wr + start, wpad, n * sizeof(float));
            quantize_block(mbuf, size, cm, ms + at, mm);
            quantize_block(vbuf, size, cv, vs + at, vm);
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
            quantize_block(x + r * code_cols + start, size, codes + r * code_cols + start,
                           absmax + r * blocks + k, M);
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
        ("pmax", ctypes.c_float),
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


def band_constants(signed: bool) -> list[tuple[float, float, float]]:
    """Per exponent band ``i``: ``(mult, off, base)`` with the candidate magnitude index
    ``⌊|x|·mult − off⌋ + base`` (``mult = 10^(6−i)·q/0.9``, ``off = 0.1·q/0.9 + ½``, ``base`` =
    codes below the band; ``q`` codes in the band)."""
    below = 1 if signed else 2
    out = []
    for i in range(7):
        q = 2 ** (i if signed else i + 1)
        out.append((10.0 ** (6 - i) * q / 0.9, 0.1 * q / 0.9 + 0.5, float(q - below)))
    return out


@functools.cache
def _map(signed: bool) -> tuple[_Map, tuple[Tensor, ...]]:
    """The ``Map`` struct of a dynamic map, and the tensors it points into (kept alive)."""
    from shardflow.optim.quant8 import dynamic_map  # noqa: PLC0415

    code = dynamic_map(signed).contiguous()
    mids = thresholds(signed).contiguous()
    m = _Map()
    for i, (mult, off, base) in enumerate(band_constants(signed)):
        m.mult[i], m.off[i], m.base[i] = mult, off, base
    m.pmax = 126.0 if signed else 253.0
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
