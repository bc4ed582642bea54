/* WhiteFlow's passes on the CPU: the element-wise fallback in one pass, and the row passes of a
   channel-scaled hidden matrix around the projection product (which torch.mm does).
   Loaded by shardflow/ops/native/whiteflow.py (its docstring: the arithmetic, its order, and
   where it differs from the torch path). Built by shardflow/ops/native/build.py (AVX2 + FMA)
   with these macros on the command line:
     BLOCK              elements per task of the element-wise pass (whiteflow.py's BLOCK)
     PARALLEL_ELEMENTS  below this many values a loop runs on the calling thread

   Layouts: weights fp32, gradients fp32 or bf16, momentum and second moment bf16 (uint16 bits), all
   contiguous; a matrix is (rows, n) row-major, its projected second moment (rows, r). Example
   shapes (SmolLM2-135M): the embedding 49152x576 element-wise; gate_proj 1536x576, r = 256. */

#ifndef BLOCK
#error "BLOCK comes from the builder: -DBLOCK=... (shardflow/ops/native/whiteflow.py)"
#endif
#ifndef PARALLEL_ELEMENTS
#error "PARALLEL_ELEMENTS comes from the builder (shardflow/ops/native/build.py)"
#endif

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* WhiteFlow._hyper's scalars, in its order, rounded to fp32 as the torch path's tensor is */
typedef struct {
    float c, omb1, corr1, b2, omb2, inv_weight, eps, decay, eta;
} Hyper;

/* one parameter; the SR stream of m and v: element i draws lowbias32((offset + i) ^ key) */
typedef struct {
    Hyper h;
    float* w;
    const void* g;               /* fp32, or bf16 bits where g_bf16 */
    uint16_t* m;
    uint16_t* v;
    int64_t rows, n, r;          /* element-wise: rows = 1, n = numel; dense: r = n */
    int64_t offset_m, offset_v;  /* global index of m[0] and v[0] in their streams */
    uint32_t key_m, key_v;
    int32_t sr;                  /* 1: stochastic rounding, 0: round to nearest even */
    int32_t g_bf16;              /* the gradient is bf16 (read exactly as fp32) */
} Job;

int32_t swf_version(void) { return 1; }

/* ---- 8 lanes at a time ------------------------------------------------------------------- */

static inline __m256 set1(float x) { return _mm256_set1_ps(x); }
static inline __m256i set1i(uint32_t x) { return _mm256_set1_epi32((int32_t)x); }

static inline __m256 load_bf16(const uint16_t* p) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* r holds 8 values <= 0xFFFF in its 32-bit lanes */
static inline void store_bf16(uint16_t* p, __m256i r) {
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
}

/* the gradient, fp32 or bf16: 8 values from element i, one value, k values into fp32 */
typedef struct {
    const void* p;
    int bf16;
} Grad;

static inline __m256 gload(Grad g, int64_t i) {
    return g.bf16 ? load_bf16((const uint16_t*)g.p + i) : _mm256_loadu_ps((const float*)g.p + i);
}

static inline float gat(Grad g, int64_t i) {
    if (!g.bf16) return ((const float*)g.p)[i];
    uint32_t u = (uint32_t)((const uint16_t*)g.p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline void gcopy(float* dst, Grad g, int64_t i, int64_t k) {
    for (int64_t q = 0; q < k; q++) dst[q] = gat(g, i + q);
}

static inline Grad grad_of(const Job* J, int64_t offset) {
    Grad g = {J->g_bf16 ? (const void*)((const uint16_t*)J->g + offset)
                        : (const void*)((const float*)J->g + offset),
              J->g_bf16};
    return g;
}

static inline Grad fp32_grad(const float* p) {
    Grad g = {p, 0};
    return g;
}

static inline __m256i lowbias32(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, set1i(0x7FEB352Du));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, set1i(0x846CA68Bu));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

/* x rounded to bf16 (bits in 32-bit lanes). Stochastic: precision.bf16_stochastic's bits, element
   index `index` of the stream `key`; a result that is NaN becomes 0xFFFF (as rounding.c).
   Nearest: round to nearest even; a NaN input becomes 0xFFFF (torch's vectorized conversion). */
static inline __m256i round8(__m256 x, __m256i index, __m256i key, int sr) {
    __m256i bits = _mm256_castps_si256(x);
    __m256i low16 = set1i(0xFFFFu);
    if (sr) {
        __m256i noise = _mm256_and_si256(lowbias32(_mm256_xor_si256(index, key)), low16);
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, noise), 16);
        /* NaN: exponent all ones and a nonzero mantissa, i.e. r & 0x7FFF above 0x7F80 */
        __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(r, set1i(0x7FFFu)), set1i(0x7F80u));
        return _mm256_or_si256(r, _mm256_srli_epi32(nan, 16));
    }
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), set1i(1u));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(set1i(0x7FFFu), lsb)), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_or_si256(r, _mm256_and_si256(nan, low16));
}

static inline __m256i lanes_from(uint32_t first) {
    return _mm256_add_epi32(set1i(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline __m256d lo_pd(__m256 x) { return _mm256_cvtps_pd(_mm256_castps256_ps128(x)); }
static inline __m256d hi_pd(__m256 x) { return _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)); }

static inline __m256d sq_acc(__m256d acc, __m256 x) {
    acc = _mm256_fmadd_pd(lo_pd(x), lo_pd(x), acc);
    return _mm256_fmadd_pd(hi_pd(x), hi_pd(x), acc);
}

static inline double hsum(__m256d x) {
    double l[4];
    _mm256_storeu_pd(l, x);
    return (l[0] + l[1]) + (l[2] + l[3]);
}

/* all ones in the first k lanes (0 < k <= 8), zeros beyond */
static inline __m256 first_lanes(int64_t k) {
    return _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

/* Tails: up to 7 elements are copied into 8-lane buffers (zeros beyond), run through the same
   vector code, and copied back, so that every element takes the same arithmetic. */
typedef struct {
    float w[8], g[8], f[8], o[8];
    uint16_t m[8], v[8];
} Tail;

/* ---- the element-wise fallback (Adam with the warmed-up second moment) --------------------- */

/* the scalars broadcast once per range (a store through w, m or v cannot change them) */
typedef struct {
    __m256 c, omb1, corr1, b2, omb2, inv_weight, eps, decay, eta;
} HyperV;

static inline HyperV broadcast(const Hyper* h) {
    HyperV x = {set1(h->c), set1(h->omb1), set1(h->corr1), set1(h->b2), set1(h->omb2),
                set1(h->inv_weight), set1(h->eps), set1(h->decay), set1(h->eta)};
    return x;
}

/* 8 elements: g <- g*c; mom = lerp(m, g, 1-b1) = fma(1-b1, g - m, m) (torch.lerp's vectorized
   formula, weight < 1/2); sq = v*b2 + ((1-b2)*g)*g; m, v <- rounded; u = (mom*corr1) /
   (sqrt(sq*inv_weight) + eps); w <- w*decay - eta*u. Returns u. With `norm_only` nothing is
   written. */
static inline __m256 ew8(const HyperV* h, float* w, Grad g, int64_t gi, uint16_t* m, uint16_t* v,
                         __m256i index, __m256i km, __m256i kv, int sr, int norm_only) {
    __m256 gs = _mm256_mul_ps(gload(g, gi), h->c);
    __m256 mf = load_bf16(m);
    __m256 mom = _mm256_fmadd_ps(h->omb1, _mm256_sub_ps(gs, mf), mf);
    __m256 sq = _mm256_add_ps(_mm256_mul_ps(load_bf16(v), h->b2),
                              _mm256_mul_ps(_mm256_mul_ps(h->omb2, gs), gs));
    __m256 den = _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(sq, h->inv_weight)), h->eps);
    __m256 u = _mm256_div_ps(_mm256_mul_ps(mom, h->corr1), den);
    if (norm_only) return u;
    store_bf16(m, round8(mom, index, km, sr));
    store_bf16(v, round8(sq, index, kv, sr));
    __m256 w0 = _mm256_mul_ps(_mm256_loadu_ps(w), h->decay);
    _mm256_storeu_ps(w, _mm256_sub_ps(w0, _mm256_mul_ps(h->eta, u)));
    return u;
}

static double ew_range(const Job* J, int64_t a, int64_t b, int norm_only) {
    const HyperV h = broadcast(&J->h);
    float* w = J->w;
    const Grad g = grad_of(J, 0);
    uint16_t *m = J->m, *v = J->v;
    const int sr = J->sr;
    const uint32_t offset = (uint32_t)J->offset_m;
    __m256i km = set1i(J->key_m), kv = set1i(J->key_v);
    __m256d acc = _mm256_setzero_pd();
    int64_t i = a;
    if (norm_only) {
        for (; i + 8 <= b; i += 8)
            acc = sq_acc(acc, ew8(&h, w + i, g, i, m + i, v + i, km, km, kv, sr, 1));
    } else if (sr) {
        for (; i + 8 <= b; i += 8)
            ew8(&h, w + i, g, i, m + i, v + i, lanes_from(offset + (uint32_t)i), km, kv, 1, 0);
    } else {
        for (; i + 8 <= b; i += 8)
            ew8(&h, w + i, g, i, m + i, v + i, km, km, kv, 0, 0);
    }
    if (i < b) {
        int64_t k = b - i;
        Tail t;
        memset(&t, 0, sizeof t);
        memcpy(t.w, w + i, k * sizeof(float));
        gcopy(t.g, g, i, k);
        memcpy(t.m, m + i, k * sizeof(uint16_t));
        memcpy(t.v, v + i, k * sizeof(uint16_t));
        __m256 u = ew8(&h, t.w, fp32_grad(t.g), 0, t.m, t.v, lanes_from(offset + (uint32_t)i), km,
                       kv, sr, norm_only);
        if (norm_only) acc = sq_acc(acc, _mm256_and_ps(u, first_lanes(k)));
        else {
            memcpy(w + i, t.w, k * sizeof(float));
            memcpy(m + i, t.m, k * sizeof(uint16_t));
            memcpy(v + i, t.v, k * sizeof(uint16_t));
        }
    }
    return hsum(acc);
}

/* The element-wise step of every job (n = numel each), cut into blocks of BLOCK elements shared
   among the threads. With norm_only, nothing is written and usq[j] = sum of u*u over job j (the
   blocks' sums added in block order: independent of the thread count). */
void swf_elementwise(int64_t count, const Job* jobs, int32_t norm_only, double* usq) {
    int64_t blocks = 0, numel = 0;
    for (int64_t j = 0; j < count; j++) {
        blocks += (jobs[j].n + BLOCK - 1) / BLOCK;
        numel += jobs[j].n;
    }
    if (blocks == 0) {
        for (int64_t j = 0; j < count; j++)
            if (usq) usq[j] = 0.0;
        return;
    }
    int64_t* owner = (int64_t*)malloc(blocks * sizeof(int64_t));
    int64_t* start = (int64_t*)malloc(blocks * sizeof(int64_t));
    double* sums = (double*)malloc(blocks * sizeof(double));
    int64_t p = 0;
    for (int64_t j = 0; j < count; j++)
        for (int64_t a = 0; a < jobs[j].n; a += BLOCK) { owner[p] = j; start[p++] = a; }
    #pragma omp parallel for schedule(dynamic, 1) if (numel >= PARALLEL_ELEMENTS)
    for (int64_t k = 0; k < blocks; k++) {
        const Job* J = &jobs[owner[k]];
        int64_t a = start[k], b = a + BLOCK < J->n ? a + BLOCK : J->n;
        sums[k] = ew_range(J, a, b, norm_only);
    }
    if (usq) {
        for (int64_t j = 0; j < count; j++) usq[j] = 0.0;
        for (int64_t k = 0; k < blocks; k++) usq[owner[k]] += sums[k];
    }
    free(owner); free(start); free(sums);
}

/* ---- hidden matrices: per row ------------------------------------------------------------- */

/* (<g,w>, |w|^2, |g|^2) of one row, g already times c, products and sums in fp64 */
static void row_sums(const float* w, Grad g, int64_t n, float c, float out[3]) {
    __m256d gw = _mm256_setzero_pd(), ww = _mm256_setzero_pd(), gg = _mm256_setzero_pd();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 gs = _mm256_mul_ps(gload(g, j), set1(c));
        __m256 wv = _mm256_loadu_ps(w + j);
        gw = _mm256_fmadd_pd(lo_pd(gs), lo_pd(wv), gw);
        gw = _mm256_fmadd_pd(hi_pd(gs), hi_pd(wv), gw);
        ww = sq_acc(ww, wv);
        gg = sq_acc(gg, gs);
    }
    double sgw = hsum(gw), sww = hsum(ww), sgg = hsum(gg);
    for (; j < n; j++) {
        float gs = gat(g, j) * c;
        sgw += (double)gs * (double)w[j];
        sww += (double)w[j] * (double)w[j];
        sgg += (double)gs * (double)gs;
    }
    out[0] = (float)sgw;
    out[1] = (float)sww;
    out[2] = (float)sgg;
}

/* orthogonalize.orthograd_fold(restore_norm=True) in fp32: g_perp = a*g - b*w */
static void fold(const float s[3], float* a, float* b) {
    float gw = s[0], ww = s[1], gg = s[2];
    float coef = ww > 0.0f ? gw / (ww > FLT_MIN ? ww : FLT_MIN) : 0.0f;
    float after = gg - coef * gw;
    int parallel = after <= gg * (1024.0f * FLT_EPSILON);
    float factor = gg > 0.0f ? sqrtf(gg / (after > FLT_MIN ? after : FLT_MIN)) : 1.0f;
    if (parallel && gg > 0.0f) factor = 0.0f;
    *a = factor;
    *b = factor * coef;
}

/* 8 columns of a row: gp = a*(g*c) - b*w; mom = fma(1-b1, gp - m, m) */
static inline __m256 perp8(const float* w, Grad g, int64_t gi, __m256 c, __m256 a, __m256 b) {
    __m256 gs = _mm256_mul_ps(gload(g, gi), c);
    return _mm256_sub_ps(_mm256_mul_ps(a, gs), _mm256_mul_ps(b, _mm256_loadu_ps(w)));
}

/* Projected route, first pass over rows [r0, r1) of a chunk (row k of the chunk is row r0 + k):
   writes g_perp to x[k] and the fp32 momentum to x[r1 - r0 + k] (x: 2*(r1-r0) rows of n), and
   (a, b, |mom|^2) to coef[row][0..2]. */
void swf_rows_prepare(const Job* J, int64_t r0, int64_t r1, float* x, float* coef) {
    const int64_t n = J->n, k_rows = r1 - r0;
    const Hyper* h = &J->h;
    #pragma omp parallel for schedule(static) if (k_rows * n >= PARALLEL_ELEMENTS)
    for (int64_t row = r0; row < r1; row++) {
        const float* w = J->w + row * n;
        const Grad g = grad_of(J, row * n);
        const uint16_t* m = J->m + row * n;
        float* gp_out = x + (row - r0) * n;
        float* mom_out = x + (k_rows + row - r0) * n;
        float s[3], a, b;
        row_sums(w, g, n, h->c, s);
        fold(s, &a, &b);
        __m256 va = set1(a), vb = set1(b), vc = set1(h->c), omb1 = set1(h->omb1);
        __m256d msq = _mm256_setzero_pd();
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {
            __m256 gp = perp8(w + j, g, j, vc, va, vb);
            __m256 mf = load_bf16(m + j);
            __m256 mom = _mm256_fmadd_ps(omb1, _mm256_sub_ps(gp, mf), mf);
            _mm256_storeu_ps(gp_out + j, gp);
            _mm256_storeu_ps(mom_out + j, mom);
            msq = sq_acc(msq, mom);
        }
        if (j < n) {
            int64_t k = n - j;
            Tail t;
            memset(&t, 0, sizeof t);
            memcpy(t.w, w + j, k * sizeof(float));
            gcopy(t.g, g, j, k);
            memcpy(t.m, m + j, k * sizeof(uint16_t));
            __m256 gp = perp8(t.w, fp32_grad(t.g), 0, vc, va, vb);
            __m256 mf = load_bf16(t.m);
            __m256 mom = _mm256_fmadd_ps(omb1, _mm256_sub_ps(gp, mf), mf);
            _mm256_storeu_ps(t.f, gp);
            _mm256_storeu_ps(t.o, mom);
            msq = sq_acc(msq, _mm256_and_ps(mom, first_lanes(k)));
            memcpy(gp_out + j, t.f, k * sizeof(float));
            memcpy(mom_out + j, t.o, k * sizeof(float));
        }
        coef[row * 4 + 0] = a;
        coef[row * 4 + 1] = b;
        coef[row * 4 + 2] = (float)hsum(msq);
    }
}

/* the row's momentum stored (rounded) and its weights moved: w <- w*decay - (eta*corr1*s)*mom */
static void apply_row(const Job* J, int64_t row, const float* mom, float s) {
    const int64_t n = J->n;
    const Hyper* h = &J->h;
    float* w = J->w + row * n;
    uint16_t* m = J->m + row * n;
    __m256 step = set1((h->eta * h->corr1) * s), decay = set1(h->decay);
    __m256i km = set1i(J->key_m);
    uint32_t first = (uint32_t)(J->offset_m + row * n);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 mv = _mm256_loadu_ps(mom + j);
        store_bf16(m + j, round8(mv, lanes_from(first + (uint32_t)j), km, J->sr));
        __m256 w0 = _mm256_mul_ps(_mm256_loadu_ps(w + j), decay);
        _mm256_storeu_ps(w + j, _mm256_sub_ps(w0, _mm256_mul_ps(step, mv)));
    }
    if (j < n) {
        int64_t k = n - j;
        Tail t;
        memset(&t, 0, sizeof t);
        memcpy(t.o, mom + j, k * sizeof(float));
        memcpy(t.w, w + j, k * sizeof(float));
        __m256 mv = _mm256_loadu_ps(t.o);
        store_bf16(t.m, round8(mv, lanes_from(first + (uint32_t)j), km, J->sr));
        __m256 w0 = _mm256_mul_ps(_mm256_loadu_ps(t.w), decay);
        _mm256_storeu_ps(t.w, _mm256_sub_ps(w0, _mm256_mul_ps(step, mv)));
        memcpy(m + j, t.m, k * sizeof(uint16_t));
        memcpy(w + j, t.w, k * sizeof(float));
    }
}

/* the channel scale from |adapted| and |ref| (whiteflow._ratio: 0 where |ref| is 0) */
static float ratio(double adapted_sq, double ref_sq) {
    float num = (float)sqrt(adapted_sq), den = (float)sqrt(ref_sq);
    return den > 0.0f ? num / (den > FLT_MIN ? den : FLT_MIN) : 0.0f;
}

/* Projected route, second pass over the chunk's rows, given z = x @ P (2*(r1-r0) rows of r:
   R = g_perp P, then mom P): v <- rounded v*b2 + ((1-b2)*R)*R; M_R = corr1*(mom P); the channel
   scale s = sqrt(n/r) * |M_R / (sqrt(v*inv_weight) + eps)| / |M_R| (0 for a zero row); coef[row]
   <- (a*c, b, s, (s*|M_hat|)^2). With `apply`, the row's momentum is stored and its weights
   moved (apply_row, mom from x); without, the caller does it later (the norm-growth limiter). */
void swf_rows_finish(const Job* J, int64_t r0, int64_t r1, const float* x, const float* z,
                     float* coef, float root_n_over_r, int32_t apply) {
    const int64_t n = J->n, r = J->r, k_rows = r1 - r0;
    const Hyper* h = &J->h;
    #pragma omp parallel for schedule(static) if (k_rows * n >= PARALLEL_ELEMENTS)
    for (int64_t row = r0; row < r1; row++) {
        const float* R = z + (row - r0) * r;
        const float* MP = z + (k_rows + row - r0) * r;
        uint16_t* v = J->v + row * r;
        __m256i kv = set1i(J->key_v);
        uint32_t first = (uint32_t)(J->offset_v + row * r);
        __m256 b2 = set1(h->b2), omb2 = set1(h->omb2), iw = set1(h->inv_weight);
        __m256 eps = set1(h->eps), corr1 = set1(h->corr1);
        __m256d na = _mm256_setzero_pd(), nm = _mm256_setzero_pd();
        int64_t j = 0;
        for (; j + 8 <= r; j += 8) {
            __m256 rv = _mm256_loadu_ps(R + j);
            __m256 sq = _mm256_add_ps(_mm256_mul_ps(load_bf16(v + j), b2),
                                      _mm256_mul_ps(_mm256_mul_ps(omb2, rv), rv));
            store_bf16(v + j, round8(sq, lanes_from(first + (uint32_t)j), kv, J->sr));
            __m256 mr = _mm256_mul_ps(corr1, _mm256_loadu_ps(MP + j));
            __m256 den = _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(sq, iw)), eps);
            na = sq_acc(na, _mm256_div_ps(mr, den));
            nm = sq_acc(nm, mr);
        }
        if (j < r) {
            int64_t k = r - j;
            Tail t;
            memset(&t, 0, sizeof t);
            memcpy(t.f, R + j, k * sizeof(float));
            memcpy(t.o, MP + j, k * sizeof(float));
            memcpy(t.v, v + j, k * sizeof(uint16_t));
            __m256 rv = _mm256_loadu_ps(t.f);
            __m256 sq = _mm256_add_ps(_mm256_mul_ps(load_bf16(t.v), b2),
                                      _mm256_mul_ps(_mm256_mul_ps(omb2, rv), rv));
            store_bf16(t.v, round8(sq, lanes_from(first + (uint32_t)j), kv, J->sr));
            __m256 mr = _mm256_mul_ps(corr1, _mm256_loadu_ps(t.o));
            __m256 den = _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(sq, iw)), eps);
            __m256 keep = first_lanes(k);  /* padding lanes are 0/eps: NaN where eps = 0 */
            na = sq_acc(na, _mm256_and_ps(_mm256_div_ps(mr, den), keep));
            nm = sq_acc(nm, _mm256_and_ps(mr, keep));
            memcpy(v + j, t.v, k * sizeof(uint16_t));
        }
        float s = ratio(hsum(na), hsum(nm)) * root_n_over_r;
        float a = coef[row * 4 + 0], b = coef[row * 4 + 1];
        float mhat_norm = (float)sqrt((double)coef[row * 4 + 2]) * h->corr1;
        float u = s * mhat_norm;
        coef[row * 4 + 0] = a * h->c;
        coef[row * 4 + 1] = b;
        coef[row * 4 + 2] = s;
        coef[row * 4 + 3] = u * u;
        if (apply) apply_row(J, row, x + (k_rows + row - r0) * n, s);
    }
}

/* Dense route, rows [r0, r1) in one pass each (v full size): sums, fold, then per 8 columns
   g_perp, mom, sq (stored rounded), M_hat = mom*corr1 and M_hat / (sqrt(sq*inv_weight) + eps)
   into the norms; s = |adapted| / |M_hat|; coef[row] <- (a*c, b, s, (s*|M_hat|)^2); with `apply`
   the row's momentum is stored and its weights moved (mom kept in a row buffer). */
void swf_rows_dense(const Job* J, int64_t r0, int64_t r1, float* coef, int32_t apply) {
    const int64_t n = J->n, k_rows = r1 - r0;
    const Hyper* h = &J->h;
    #pragma omp parallel if (k_rows * n >= PARALLEL_ELEMENTS)
    {
        float* buf = (float*)malloc((n + 8) * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t row = r0; row < r1; row++) {
            const float* w = J->w + row * n;
            const Grad g = grad_of(J, row * n);
            const uint16_t* m = J->m + row * n;
            uint16_t* v = J->v + row * n;
            float s3[3], a, b;
            row_sums(w, g, n, h->c, s3);
            fold(s3, &a, &b);
            __m256 va = set1(a), vb = set1(b), vc = set1(h->c), omb1 = set1(h->omb1);
            __m256 b2 = set1(h->b2), omb2 = set1(h->omb2), iw = set1(h->inv_weight);
            __m256 eps = set1(h->eps), corr1 = set1(h->corr1);
            __m256i kv = set1i(J->key_v);
            uint32_t first = (uint32_t)(J->offset_v + row * n);
            __m256d na = _mm256_setzero_pd(), nm = _mm256_setzero_pd();
            for (int64_t j = 0; j < n; j += 8) {
                int64_t k = n - j < 8 ? n - j : 8;
                Tail t;
                const float* wp = w + j;
                Grad gp_in = g;
                int64_t gi = j;
                const uint16_t* mp = m + j;
                uint16_t* vp = v + j;
                if (k < 8) {
                    memset(&t, 0, sizeof t);
                    memcpy(t.w, w + j, k * sizeof(float));
                    gcopy(t.g, g, j, k);
                    memcpy(t.m, m + j, k * sizeof(uint16_t));
                    memcpy(t.v, v + j, k * sizeof(uint16_t));
                    wp = t.w; gp_in = fp32_grad(t.g); gi = 0; mp = t.m; vp = t.v;
                }
                __m256 gp = perp8(wp, gp_in, gi, vc, va, vb);
                __m256 mf = load_bf16(mp);
                __m256 mom = _mm256_fmadd_ps(omb1, _mm256_sub_ps(gp, mf), mf);
                __m256 sq = _mm256_add_ps(_mm256_mul_ps(load_bf16(vp), b2),
                                          _mm256_mul_ps(_mm256_mul_ps(omb2, gp), gp));
                store_bf16(vp, round8(sq, lanes_from(first + (uint32_t)j), kv, J->sr));
                __m256 mhat = _mm256_mul_ps(mom, corr1);
                __m256 den = _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(sq, iw)), eps);
                __m256 keep = first_lanes(k);  /* padding lanes are 0/eps: NaN where eps = 0 */
                na = sq_acc(na, _mm256_and_ps(_mm256_div_ps(mhat, den), keep));
                nm = sq_acc(nm, _mm256_and_ps(mhat, keep));
                _mm256_storeu_ps(buf + j, mom);
                if (k < 8) memcpy(v + j, t.v, k * sizeof(uint16_t));
            }
            double mhat_sq = hsum(nm);
            float s = ratio(hsum(na), mhat_sq);
            float u = s * (float)sqrt(mhat_sq);
            coef[row * 4 + 0] = a * h->c;
            coef[row * 4 + 1] = b;
            coef[row * 4 + 2] = s;
            coef[row * 4 + 3] = u * u;
            if (apply) apply_row(J, row, buf, s);
        }
        free(buf);
    }
}

/* Channel-scaled rows after the norm-growth limiter, from coef (a*c, b, s): g_perp = (a*c)*g -
   b*w and mom = fma(1-b1, g_perp - m, m) recomputed from the raw gradient, as whiteflow_apply_
   does (the stored momentum is rounded; the rule moves the weights by the fp32 value), then
   apply_row. */
void swf_rows_apply(const Job* J, int64_t r0, int64_t r1, const float* coef) {
    const int64_t n = J->n, k_rows = r1 - r0;
    const Hyper* h = &J->h;
    #pragma omp parallel if (k_rows * n >= PARALLEL_ELEMENTS)
    {
        float* buf = (float*)malloc((n + 8) * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t row = r0; row < r1; row++) {
            const float* w = J->w + row * n;
            const Grad g = grad_of(J, row * n);
            const uint16_t* m = J->m + row * n;
            __m256 ac = set1(coef[row * 4 + 0]), vb = set1(coef[row * 4 + 1]);
            __m256 omb1 = set1(h->omb1), one = set1(1.0f);
            for (int64_t j = 0; j < n; j += 8) {
                int64_t k = n - j < 8 ? n - j : 8;
                Tail t;
                const float* wp = w + j;
                Grad gp_in = g;
                int64_t gi = j;
                const uint16_t* mp = m + j;
                if (k < 8) {
                    memset(&t, 0, sizeof t);
                    memcpy(t.w, w + j, k * sizeof(float));
                    gcopy(t.g, g, j, k);
                    memcpy(t.m, m + j, k * sizeof(uint16_t));
                    wp = t.w; gp_in = fp32_grad(t.g); gi = 0; mp = t.m;
                }
                __m256 gp = perp8(wp, gp_in, gi, one, ac, vb);  /* (a*c)*g - b*w */
                __m256 mf = load_bf16(mp);
                _mm256_storeu_ps(buf + j, _mm256_fmadd_ps(omb1, _mm256_sub_ps(gp, mf), mf));
            }
            apply_row(J, row, buf, coef[row * 4 + 2]);
        }
        free(buf);
    }
}
