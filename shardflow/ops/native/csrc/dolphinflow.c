/* DolphinFlow's element-wise step on fp32 weights and moments: one pass per parameter.
   Loaded by shardflow/ops/native/dolphinflow.py (its docstring: why, and what it is checked
   against). The rule itself is dolphinflow_rule.h's (the reference rule's operations in its
   order). Built by shardflow/ops/native/build.py (AVX2) with these macros on the command line:
     PIECE              values per unit of work of one thread (dolphinflow.py's PIECE)
     PARALLEL_ELEMENTS  below this many values a loop runs on the calling thread

   Example shapes (SmolLM2-135M): the embedding 49152x576 (28.3 M values, no fold: one row of
   coefficients for all), gate/up 1536x576 with ⊥Grad per row (a, b per row of 576). */

#ifndef PIECE
#error "PIECE comes from the builder: -DPIECE=... (shardflow/ops/native/dolphinflow.py)"
#endif
#ifndef PARALLEL_ELEMENTS
#error "PARALLEL_ELEMENTS comes from the builder (shardflow/ops/native/build.py)"
#endif

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define W 8
typedef __m256 vf;
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VSET _mm256_set1_ps
#define VADD _mm256_add_ps
#define VSUB _mm256_sub_ps
#define VMUL _mm256_mul_ps
#define VDIV _mm256_div_ps
#define VSQRT _mm256_sqrt_ps

#include "dolphinflow_rule.h"

int32_t sfd_version(void) { return 2; }

/* Weights and gradients come as fp32 or bf16 (`es`: bytes per value, 4 or 2; a flag the
   callers pass as a constant, so each combination is its own loop). A bf16 weight is read as
   its fp32 value plus its Kahan compensation c (NULL: none) and written back as
   shardflow/ops/precision.py's store_weight_ does it: w = round(x), c = round(x - w), round to
   nearest even (c NULL: the weight rounded to nearest alone). bf16 -> fp32 is exact. */

static inline vf load_bf16(const uint16_t* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* round 8 floats to bf16, nearest even (a NaN stays a quiet NaN), as kahan.c's to_bf16 */
static inline __m128i round_bf16(vf x) {
    __m256i bits = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000));
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF)),
                                     _mm256_set1_epi32(0x7F800000));
    __m256i r = _mm256_srli_epi32(_mm256_blendv_epi8(up, quiet, nan), 16);
    __m256i packed = _mm256_packus_epi32(r, r); /* per 128-bit lane: r0..3 r0..3 | r4..7 r4..7 */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

static inline __attribute__((always_inline)) vf load_x(const void* p, int64_t x, const int es) {
    return es == 2 ? load_bf16((const uint16_t*)p + x) : VLOAD((const float*)p + x);
}

/* the weight's fp32 value: w, or w + c for a bf16 weight with a compensation */
static inline __attribute__((always_inline)) vf load_w(const void* w, const void* c, int64_t x,
                                                       const int es) {
    vf r = load_x(w, x, es);
    return es == 2 && c ? VADD(r, load_bf16((const uint16_t*)c + x)) : r;
}

static inline __attribute__((always_inline)) void store_w(void* w, void* c, int64_t x, vf value,
                                                          const int es) {
    if (es == 4) { VSTORE((float*)w + x, value); return; }
    __m128i r = round_bf16(value);
    _mm_storeu_si128((__m128i*)((uint16_t*)w + x), r);
    if (!c) return;
    vf rounded = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r), 16));
    _mm_storeu_si128((__m128i*)((uint16_t*)c + x), round_bf16(VSUB(value, rounded)));
}

/* one value's fp32: a weight (plus its compensation) or a gradient, as load_w / load_x */
static inline float value_at(const void* p, const void* c, int64_t x, const int es) {
    if (es == 4) return ((const float*)p)[x];
    uint32_t bits = (uint32_t)((const uint16_t*)p)[x] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return c ? f + value_at(c, 0, x, 2) : f;
}

/* values [i, j) of one row: coefficients a, b (folded) or c; out: the direction only.
   ew, eg: bytes per weight and per gradient value (constants at every call). */
static inline __attribute__((always_inline)) void run(
    int64_t i, int64_t j, void* w, void* wc, const void* g, float* m, float* v, float* out,
    float fa, float fb, const DFConst* k, const int folded, const int nesterov,
    const int adaptive, const int ew, const int eg) {
    vf a = VSET(fa), b = VSET(fb);
    int64_t e = i + (j - i) / W * W;
    for (int64_t x = i; x < e; x += W) {
        vf w0 = load_w(w, wc, x, ew), mm = VLOAD(m + x);
        vf vv = adaptive ? VLOAD(v + x) : mm;
        vf u = df_direction(df_grad(load_x(g, x, eg), w0, a, b, k, folded), &mm, &vv, k, nesterov, adaptive);
        VSTORE(m + x, mm);
        if (adaptive) VSTORE(v + x, vv);
        if (out) VSTORE(out + x, u); else store_w(w, wc, x, df_apply(w0, u, k), ew);
    }
    if (e < j) { /* the row's last < 8 values, through padded vectors */
        const int64_t t = j - e;
        float wt[W] = {0}, ct[W] = {0}, gt[W] = {0}, mt[W] = {0}, vt[W] = {0}, ut[W];
        memcpy(wt, (char*)w + e * ew, t * ew);
        if (ew == 2 && wc) memcpy(ct, (char*)wc + e * 2, t * 2);
        memcpy(gt, (const char*)g + e * eg, t * eg);
        memcpy(mt, m + e, t * 4);
        if (adaptive) memcpy(vt, v + e, t * 4);
        vf w0 = load_w(wt, ew == 2 && wc ? ct : 0, 0, ew), mm = VLOAD(mt), vv = VLOAD(vt);
        vf u = df_direction(df_grad(load_x(gt, 0, eg), w0, a, b, k, folded), &mm, &vv, k, nesterov, adaptive);
        VSTORE(mt, mm); VSTORE(vt, vv);
        memcpy(m + e, mt, t * 4);
        if (adaptive) memcpy(v + e, vt, t * 4);
        if (out) { VSTORE(ut, u); memcpy(out + e, ut, t * 4); return; }
        store_w(wt, ew == 2 && wc ? ct : 0, 0, df_apply(w0, u, k), ew);
        memcpy((char*)w + e * ew, wt, t * ew);
        if (ew == 2 && wc) memcpy((char*)wc + e * 2, ct, t * 2);
    }
}

/* one row's run with the flags as constants: a specialised loop per combination */
static inline __attribute__((always_inline)) void run_row(
    int64_t i, int64_t j, void* w, void* wc, const void* g, float* m, float* v, float* out,
    float fa, float fb, const DFConst* k, const int folded, const int nesterov,
    const int adaptive, const int ew, const int eg) {
    if (nesterov && adaptive) run(i, j, w, wc, g, m, v, out, fa, fb, k, folded, 1, 1, ew, eg);
    else run(i, j, w, wc, g, m, v, out, fa, fb, k, folded, nesterov, adaptive, ew, eg);
}

static inline __attribute__((always_inline)) void run_typed(
    int64_t i, int64_t j, void* w, void* wc, const void* g, float* m, float* v, float* out,
    float fa, float fb, const DFConst* k, const int folded, const int nesterov,
    const int adaptive, const int ew, const int eg) {
    if (folded) run_row(i, j, w, wc, g, m, v, out, fa, fb, k, 1, nesterov, adaptive, ew, eg);
    else run_row(i, j, w, wc, g, m, v, out, 0.0f, 0.0f, k, 0, nesterov, adaptive, ew, eg);
}

/* One step of n values in rows of `cols`: fa, fb (NULL: no fold) hold a row's coefficients at
   row * fold_stride (stride 0: one pair for all). v unused without R->adaptive. out (NULL: the
   weights are updated) receives the direction. w_bytes, g_bytes: 4 (fp32) or 2 (bf16); wc: a
   bf16 weight's Kahan compensation (NULL: none). Pieces of PIECE values are shared among
   threads. */
void sfd_step(int64_t n, int64_t cols, void* w, void* wc, int32_t w_bytes, const void* g,
              int32_t g_bytes, float* m, float* v, const float* fa, const float* fb,
              int64_t fold_stride, float* out, const DFRule* R) {
    const DFConst k = df_const(R);
    const int nesterov = R->nesterov, adaptive = R->adaptive, folded = fa != 0;
    int64_t pieces = (n + PIECE - 1) / PIECE;
    #pragma omp parallel for schedule(static) if (n >= PARALLEL_ELEMENTS)
    for (int64_t p = 0; p < pieces; p++) {
        int64_t i = p * PIECE, end = i + PIECE < n ? i + PIECE : n;
        while (i < end) {
            int64_t r = cols > 0 ? i / cols : 0;
            int64_t j = folded && cols > 0 && (r + 1) * cols < end ? (r + 1) * cols : end;
            float fa_r = folded ? fa[r * fold_stride] : 0.0f, fb_r = folded ? fb[r * fold_stride] : 0.0f;
            if (w_bytes == 4 && g_bytes == 4)
                run_typed(i, j, w, wc, g, m, v, out, fa_r, fb_r, &k, folded, nesterov, adaptive, 4, 4);
            else if (w_bytes == 2 && g_bytes == 2)
                run_typed(i, j, w, wc, g, m, v, out, fa_r, fb_r, &k, folded, nesterov, adaptive, 2, 2);
            else if (w_bytes == 2)
                run_typed(i, j, w, wc, g, m, v, out, fa_r, fb_r, &k, folded, nesterov, adaptive, 2, 4);
            else
                run_typed(i, j, w, wc, g, m, v, out, fa_r, fb_r, &k, folded, nesterov, adaptive, 4, 2);
            i = j;
        }
    }
}

/* ⊥Grad's sums per row of (rows, cols): out[r] = (<g,w>, |w|^2, |g|^2), each summed in fp64 (a
   product of two fp32 values is exact there) and rounded to fp32 once. g and w as in sfd_step
   (a bf16 weight's value is w + wc). */
static inline __attribute__((always_inline)) void row_sums(
    int64_t r, int64_t cols, const void* g, const void* w, const void* wc, float* out,
    const int ew, const int eg) {
    const int64_t base = r * cols;
    __m256d gw0 = _mm256_setzero_pd(), ww0 = gw0, gg0 = gw0, gw1 = gw0, ww1 = gw0, gg1 = gw0;
    int64_t e = cols / W * W;
    for (int64_t x = 0; x < e; x += W) {
        __m256 gv = load_x(g, base + x, eg), wv = load_w(w, wc, base + x, ew);
        __m256d gl = _mm256_cvtps_pd(_mm256_castps256_ps128(gv));
        __m256d gh = _mm256_cvtps_pd(_mm256_extractf128_ps(gv, 1));
        __m256d wl = _mm256_cvtps_pd(_mm256_castps256_ps128(wv));
        __m256d wh = _mm256_cvtps_pd(_mm256_extractf128_ps(wv, 1));
        gw0 = _mm256_add_pd(gw0, _mm256_mul_pd(gl, wl)); gw1 = _mm256_add_pd(gw1, _mm256_mul_pd(gh, wh));
        ww0 = _mm256_add_pd(ww0, _mm256_mul_pd(wl, wl)); ww1 = _mm256_add_pd(ww1, _mm256_mul_pd(wh, wh));
        gg0 = _mm256_add_pd(gg0, _mm256_mul_pd(gl, gl)); gg1 = _mm256_add_pd(gg1, _mm256_mul_pd(gh, gh));
    }
    double s[3][4];
    _mm256_storeu_pd(s[0], _mm256_add_pd(gw0, gw1));
    _mm256_storeu_pd(s[1], _mm256_add_pd(ww0, ww1));
    _mm256_storeu_pd(s[2], _mm256_add_pd(gg0, gg1));
    double t[3];
    for (int q = 0; q < 3; q++) t[q] = (s[q][0] + s[q][1]) + (s[q][2] + s[q][3]);
    for (int64_t x = e; x < cols; x++) {
        double gx = value_at(g, 0, base + x, eg), wx = value_at(w, ew == 2 ? wc : 0, base + x, ew);
        t[0] += gx * wx; t[1] += wx * wx; t[2] += gx * gx;
    }
    for (int q = 0; q < 3; q++) out[3 * r + q] = (float)t[q];
}

void sfd_row_sums(int64_t rows, int64_t cols, const void* g, int32_t g_bytes, const void* w,
                  const void* wc, int32_t w_bytes, float* out) {
    #pragma omp parallel for schedule(static) if (rows * cols >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        if (w_bytes == 4 && g_bytes == 4) row_sums(r, cols, g, w, wc, out, 4, 4);
        else if (w_bytes == 2 && g_bytes == 2) row_sums(r, cols, g, w, wc, out, 2, 2);
        else if (w_bytes == 2) row_sums(r, cols, g, w, wc, out, 2, 4);
        else row_sums(r, cols, g, w, wc, out, 4, 2);
    }
}
