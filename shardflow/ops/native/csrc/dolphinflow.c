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

int32_t sfd_version(void) { return 1; }

/* values [i, j) of one row: coefficients a, b (folded) or c; out: the direction only */
static inline __attribute__((always_inline)) void run(
    int64_t i, int64_t j, float* w, const float* g, float* m, float* v, float* out, float fa,
    float fb, const DFConst* k, const int folded, const int nesterov, const int adaptive) {
    vf a = VSET(fa), b = VSET(fb);
    int64_t e = i + (j - i) / W * W;
    for (int64_t x = i; x < e; x += W) {
        vf w0 = VLOAD(w + x), mm = VLOAD(m + x);
        vf vv = adaptive ? VLOAD(v + x) : mm;
        vf u = df_direction(df_grad(VLOAD(g + x), w0, a, b, k, folded), &mm, &vv, k, nesterov, adaptive);
        VSTORE(m + x, mm);
        if (adaptive) VSTORE(v + x, vv);
        if (out) VSTORE(out + x, u); else VSTORE(w + x, df_apply(w0, u, k));
    }
    if (e < j) { /* the row's last < 8 values, through a padded vector */
        float wt[W] = {0}, gt[W] = {0}, mt[W] = {0}, vt[W] = {0}, ut[W];
        for (int64_t x = e; x < j; x++) {
            wt[x - e] = w[x]; gt[x - e] = g[x]; mt[x - e] = m[x]; vt[x - e] = adaptive ? v[x] : 0.0f;
        }
        vf w0 = VLOAD(wt), mm = VLOAD(mt), vv = VLOAD(vt);
        vf u = df_direction(df_grad(VLOAD(gt), w0, a, b, k, folded), &mm, &vv, k, nesterov, adaptive);
        VSTORE(mt, mm); VSTORE(vt, vv);
        VSTORE(ut, out ? u : df_apply(w0, u, k));
        for (int64_t x = e; x < j; x++) {
            m[x] = mt[x - e];
            if (adaptive) v[x] = vt[x - e];
            if (out) out[x] = ut[x - e]; else w[x] = ut[x - e];
        }
    }
}

/* One step of n values in rows of `cols`: fa, fb (NULL: no fold) hold a row's coefficients at
   row * fold_stride (stride 0: one pair for all). v unused without R->adaptive. out (NULL: the
   weights are updated) receives the direction. Pieces of PIECE values are shared among threads. */
void sfd_step(int64_t n, int64_t cols, float* w, const float* g, float* m, float* v,
              const float* fa, const float* fb, int64_t fold_stride, float* out, const DFRule* R) {
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
            /* the flags as constants: one specialised loop each */
            if (folded) {
                if (nesterov && adaptive) run(i, j, w, g, m, v, out, fa_r, fb_r, &k, 1, 1, 1);
                else run(i, j, w, g, m, v, out, fa_r, fb_r, &k, 1, nesterov, adaptive);
            } else {
                if (nesterov && adaptive) run(i, j, w, g, m, v, out, 0.0f, 0.0f, &k, 0, 1, 1);
                else run(i, j, w, g, m, v, out, 0.0f, 0.0f, &k, 0, nesterov, adaptive);
            }
            i = j;
        }
    }
}

/* ⊥Grad's sums per row of (rows, cols): out[r] = (<g,w>, |w|^2, |g|^2), each summed in fp64 (a
   product of two fp32 values is exact there) and rounded to fp32 once. */
void sfd_row_sums(int64_t rows, int64_t cols, const float* g, const float* w, float* out) {
    #pragma omp parallel for schedule(static) if (rows * cols >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const float* gr = g + r * cols;
        const float* wr = w + r * cols;
        __m256d gw0 = _mm256_setzero_pd(), ww0 = gw0, gg0 = gw0, gw1 = gw0, ww1 = gw0, gg1 = gw0;
        int64_t e = cols / W * W;
        for (int64_t x = 0; x < e; x += W) {
            __m256 gv = _mm256_loadu_ps(gr + x), wv = _mm256_loadu_ps(wr + x);
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
            double gx = gr[x], wx = wr[x];
            t[0] += gx * wx; t[1] += wx * wx; t[2] += gx * gx;
        }
        for (int q = 0; q < 3; q++) out[3 * r + q] = (float)t[q];
    }
}
