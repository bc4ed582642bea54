/* FactoredAdam's step: one pass over each factored matrix, every matrix of a group in one call.
   Loaded by shardflow/ops/native/factored.py (its docstring: the arithmetic and its order).
   Built by shardflow/ops/native/build.py (AVX2 + FMA) with, on the command line:
     PARALLEL_ELEMENTS  below this many values the loop runs on the calling thread */

#ifndef PARALLEL_ELEMENTS
#error "PARALLEL_ELEMENTS comes from the builder (shardflow/ops/native/build.py)"
#endif

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
   accumulators and into the column accumulators (the block's partial sums, held in registers
   while two rows pass: the same additions in the same order as one row at a time). */
static inline uint8_t step8(float* w, const float* g, __m256 cm, __m256 cv, uint8_t sign,
                            __m256 rm, __m256 rv, const Rule* R, __m256* row_m, __m256* row_v,
                            __m256* col_m, __m256* col_v) {
    __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(sign), lane), lane);
    __m256 flip = _mm256_and_ps(_mm256_castsi256_ps(set), _mm256_set1_ps(-0.0f));
    __m256 m = _mm256_xor_ps(_mm256_mul_ps(rm, cm), flip);
    __m256 v = _mm256_mul_ps(rv, cv);
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
    *col_m = _mm256_add_ps(*col_m, a);
    *col_v = _mm256_add_ps(*col_v, v);
    return (uint8_t)_mm256_movemask_ps(neg);
}

static inline float hsum(__m256 x) {
    float l[8];
    _mm256_storeu_ps(l, x);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* one row's state: its weights, gradient, sign bytes, broadcast factors and row sums */
typedef struct {
    float* w;
    const float* g;
    uint8_t* s;
    __m256 rm, rv, sum_m, sum_v;
} Row;

static inline Row row_at(int64_t r, int64_t cols, int64_t nbytes, float* w, const float* g,
                         const uint16_t* rm, const float* rv, uint8_t* signs) {
    Row x = {w + r * cols, g + r * cols, signs + r * nbytes, _mm256_set1_ps(bf16(rm[r])),
             _mm256_set1_ps(rv[r]), _mm256_setzero_ps(), _mm256_setzero_ps()};
    return x;
}

/* the padded last 8 columns of a row (zeros past its end) */
static void tail8(Row* x, int64_t cols, const float* cm, const float* cv, float* pm,
                  float* pv, const Rule* R) {
    int64_t full = cols / 8, j = 8 * full, n = cols - j;
    float wp[8] = {0}, gp[8] = {0}, cmp[8] = {0}, cvp[8] = {0}, pmp[8] = {0}, pvp[8] = {0};
    memcpy(wp, x->w + j, n * sizeof(float));
    memcpy(gp, x->g + j, n * sizeof(float));
    memcpy(cmp, cm + j, n * sizeof(float));
    memcpy(cvp, cv + j, n * sizeof(float));
    memcpy(pmp, pm + j, n * sizeof(float));
    memcpy(pvp, pv + j, n * sizeof(float));
    __m256 col_m = _mm256_loadu_ps(pmp), col_v = _mm256_loadu_ps(pvp);
    x->s[full] = step8(wp, gp, _mm256_loadu_ps(cmp), _mm256_loadu_ps(cvp), x->s[full], x->rm,
                       x->rv, R, &x->sum_m, &x->sum_v, &col_m, &col_v)
                 & (uint8_t)((1u << n) - 1u);
    _mm256_storeu_ps(pmp, col_m);
    _mm256_storeu_ps(pvp, col_v);
    memcpy(x->w + j, wp, n * sizeof(float));
    memcpy(pm + j, pmp, n * sizeof(float));
    memcpy(pv + j, pvp, n * sizeof(float));
}

/* weights and gradients are read 4 KiB ahead: without it the loop, busy with its divisions,
   kept too few loads in flight and read a matrix that is not in cache at ~9 GB/s (1.3 ns per
   element on 49152x576 against 0.85 with it, one thread) */
#define AHEAD 1024
static inline void prefetch(const float* x) { _mm_prefetch((const char*)(x + AHEAD), _MM_HINT_T0); }

/* the whole 8-column groups of two rows, each group's column sums held in registers (locals
   throughout: a store of a sign byte may alias anything reached through a pointer) */
static void full_pair(Row* x0, Row* x1, int64_t full, const float* cm, const float* cv,
                      float* pm, float* pv, const Rule* R) {
    const Rule r = *R;
    float *w0 = x0->w, *w1 = x1->w;
    const float *g0 = x0->g, *g1 = x1->g;
    uint8_t *s0 = x0->s, *s1 = x1->s;
    __m256 m0 = x0->sum_m, v0 = x0->sum_v, m1 = x1->sum_m, v1 = x1->sum_v;
    __m256 rm0 = x0->rm, rv0 = x0->rv, rm1 = x1->rm, rv1 = x1->rv;
    for (int64_t k = 0; k < full; k++) {
        int64_t j = 8 * k;
        __m256 cmk = _mm256_loadu_ps(cm + j), cvk = _mm256_loadu_ps(cv + j);
        __m256 col_m = _mm256_loadu_ps(pm + j), col_v = _mm256_loadu_ps(pv + j);
        prefetch(w0 + j), prefetch(g0 + j), prefetch(w1 + j), prefetch(g1 + j);
        uint8_t b0 = step8(w0 + j, g0 + j, cmk, cvk, s0[k], rm0, rv0, &r, &m0, &v0, &col_m,
                           &col_v);
        uint8_t b1 = step8(w1 + j, g1 + j, cmk, cvk, s1[k], rm1, rv1, &r, &m1, &v1, &col_m,
                           &col_v);
        s0[k] = b0;
        s1[k] = b1;
        _mm256_storeu_ps(pm + j, col_m);
        _mm256_storeu_ps(pv + j, col_v);
    }
    x0->sum_m = m0, x0->sum_v = v0, x1->sum_m = m1, x1->sum_v = v1;
}

static void full_one(Row* x, int64_t full, const float* cm, const float* cv, float* pm,
                     float* pv, const Rule* R) {
    const Rule r = *R;
    float* w0 = x->w;
    const float* g0 = x->g;
    uint8_t* s0 = x->s;
    __m256 m0 = x->sum_m, v0 = x->sum_v, rm0 = x->rm, rv0 = x->rv;
    for (int64_t k = 0; k < full; k++) {
        int64_t j = 8 * k;
        __m256 col_m = _mm256_loadu_ps(pm + j), col_v = _mm256_loadu_ps(pv + j);
        prefetch(w0 + j), prefetch(g0 + j);
        s0[k] = step8(w0 + j, g0 + j, _mm256_loadu_ps(cm + j), _mm256_loadu_ps(cv + j), s0[k],
                      rm0, rv0, &r, &m0, &v0, &col_m, &col_v);
        _mm256_storeu_ps(pm + j, col_m);
        _mm256_storeu_ps(pv + j, col_v);
    }
    x->sum_m = m0, x->sum_v = v0;
}

/* blocks [b0, b1) of block_rows rows each (the last may be shorter), two rows at a time */
void sff_adam_blocks(int64_t b0, int64_t b1, int64_t block_rows, int64_t rows, int64_t cols,
                     float* w, const float* g, const uint16_t* rm, const float* rv,
                     const float* cm, const float* cv, uint8_t* signs, float* out_rm,
                     float* out_rv, float* part_m, float* part_v, const Rule* R) {
    int64_t nbytes = (cols + 7) / 8, full = cols / 8;
    for (int64_t b = b0; b < b1; b++) {
        float* pm = part_m + b * cols;
        float* pv = part_v + b * cols;
        memset(pm, 0, cols * sizeof(float));
        memset(pv, 0, cols * sizeof(float));
        int64_t r1 = (b + 1) * block_rows < rows ? (b + 1) * block_rows : rows;
        for (int64_t r = b * block_rows; r < r1; r += 2) {
            int two = r + 1 < r1;
            Row x[2];
            x[0] = row_at(r, cols, nbytes, w, g, rm, rv, signs);
            x[1] = row_at(two ? r + 1 : r, cols, nbytes, w, g, rm, rv, signs);
            if (two) full_pair(&x[0], &x[1], full, cm, cv, pm, pv, R);
            else full_one(&x[0], full, cm, cv, pm, pv, R);
            for (int i = 0; i < 1 + two; i++) {
                if (full < nbytes) tail8(&x[i], cols, cm, cv, pm, pv, R);
                out_rm[r + i] = hsum(x[i].sum_m);
                out_rv[r + i] = hsum(x[i].sum_v);
            }
        }
    }
}

/* one matrix of a group's call */
typedef struct {
    Rule rule;
    int64_t rows, cols, block_rows, blocks;
    float* w;
    const float* g;
    const uint16_t* rm;      /* bf16 row factor of |m| */
    float* rv;               /* row factor of v: read, then overwritten with the new row sums */
    const uint16_t* cm_raw;  /* bf16 column factor of |m|, not normalized */
    const float* cv_raw;     /* column factor of v, not normalized */
    uint8_t* signs;
    float* out;  /* new row sums of |m| (rows), column sums of |m| and v (2 cols), normalized
                    column factors (2 cols), block column partials of |m| then v (2 blocks cols) */
} Matrix;

static inline float* col_sums(const Matrix* M) { return M->out + M->rows; }
static inline float* col_norm(const Matrix* M) { return col_sums(M) + 2 * M->cols; }
static inline float* partials(const Matrix* M) { return col_norm(M) + 2 * M->cols; }

static void matrix_block(const Matrix* M, int64_t b) {
    float* part = partials(M);
    sff_adam_blocks(b, b + 1, M->block_rows, M->rows, M->cols, M->w, M->g, M->rm, M->rv,
                    col_norm(M), col_norm(M) + M->cols, M->signs, M->out, M->rv, part,
                    part + M->blocks * M->cols, &M->rule);
}

/* sums[k][j] = the blocks' partials of moment k, added in block order */
static void sum_blocks(const Matrix* M) {
    const float* part = partials(M);
    float* sums = col_sums(M);
    for (int k = 0; k < 2; k++) {
        const float* pk = part + k * M->blocks * M->cols;
        float* ok = sums + k * M->cols;
        for (int64_t j = 0; j < M->cols; j++) ok[j] = 0.0f;
        for (int64_t b = 0; b < M->blocks; b++)
            for (int64_t j = 0; j < M->cols; j++) ok[j] += pk[b * M->cols + j];
    }
}

/* `n` matrices: every (matrix, block) pair is one task for the OpenMP threads; the column sums
   are then added per matrix in block order, so no result depends on the thread count. */
void sff_adam_many(int64_t n, const Matrix* mats, int64_t numel) {
    int64_t tasks = 0;
    for (int64_t i = 0; i < n; i++) {
        sff_normalize(mats[i].cols, mats[i].cm_raw, mats[i].cv_raw, col_norm(&mats[i]),
                      col_norm(&mats[i]) + mats[i].cols);
        tasks += mats[i].blocks;
    }
    #pragma omp parallel if (numel >= PARALLEL_ELEMENTS)
    {
        int64_t i = 0, first = 0;  /* each thread walks the matrices with its own cursor */
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (t < first) { i = 0; first = 0; }
            while (t >= first + mats[i].blocks) first += mats[i++].blocks;
            matrix_block(&mats[i], t - first);
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < n; k++) sum_blocks(&mats[k]);
    }
}
