/* The gradient-norm pass: the sum of squares of many fp32 tensors in fp64, in one call.
   Loaded by shardflow/ops/native/norm.py (its docstring: why, and the summation order).
   Built by shardflow/ops/native/build.py (AVX2 + FMA) with these macros on the command line:
     PIECE              values per piece (norm.py's PIECE: the unit of work of one thread)
     PARALLEL_ELEMENTS  below this many values the loop runs on the calling thread */

#ifndef PIECE
#error "PIECE comes from the builder: -DPIECE=... (shardflow/ops/native/norm.py)"
#endif
#ifndef PARALLEL_ELEMENTS
#error "PARALLEL_ELEMENTS comes from the builder (shardflow/ops/native/build.py)"
#endif

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

static inline __m256d lo(__m256 x) { return _mm256_cvtps_pd(_mm256_castps256_ps128(x)); }
static inline __m256d hi(__m256 x) { return _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)); }

/* the squares of x[0..n) summed in fp64: four quarters read side by side, then the rest */
static double piece_sum(const float* x, int64_t n) {
    int64_t q = n / 32 * 8;
    __m256d acc[8];
    for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_pd();
    for (int64_t i = 0; i < q; i += 8) {
        for (int s = 0; s < 4; s++) {
            __m256 v = _mm256_loadu_ps(x + s * q + i);
            acc[2 * s] = _mm256_fmadd_pd(lo(v), lo(v), acc[2 * s]);
            acc[2 * s + 1] = _mm256_fmadd_pd(hi(v), hi(v), acc[2 * s + 1]);
        }
    }
    for (int k = 1; k < 8; k++) acc[0] = _mm256_add_pd(acc[0], acc[k]);
    double l[4];
    _mm256_storeu_pd(l, acc[0]);
    double total = (l[0] + l[1]) + (l[2] + l[3]);
    for (int64_t i = 4 * q; i < n; i++) total += (double)x[i] * (double)x[i];
    return total;
}

int32_t sfn_version(void) { return 1; }

/* out[t] = the sum of squares of x[t][0..len[t]) */
void sfn_sum_sq(int64_t n, const float* const* x, const int64_t* len, double* out) {
    int64_t pieces = 0;
    for (int64_t t = 0; t < n; t++) pieces += (len[t] + PIECE - 1) / PIECE;
    double* sums = (double*)malloc((pieces > 0 ? pieces : 1) * sizeof(double));
    int64_t* owner = (int64_t*)malloc((pieces > 0 ? pieces : 1) * sizeof(int64_t));
    int64_t* start = (int64_t*)malloc((pieces > 0 ? pieces : 1) * sizeof(int64_t));
    int64_t p = 0, numel = 0;
    for (int64_t t = 0; t < n; t++) {
        numel += len[t];
        for (int64_t a = 0; a < len[t]; a += PIECE) { owner[p] = t; start[p++] = a; }
    }
    #pragma omp parallel for schedule(dynamic, 1) if (numel >= PARALLEL_ELEMENTS)
    for (int64_t k = 0; k < pieces; k++) {
        int64_t t = owner[k], a = start[k];
        int64_t m = len[t] - a < PIECE ? len[t] - a : PIECE;
        sums[k] = piece_sum(x[t] + a, m);
    }
    for (int64_t t = 0; t < n; t++) out[t] = 0.0;
    for (int64_t k = 0; k < pieces; k++) out[owner[k]] += sums[k];
    free(sums); free(owner); free(start);
}
