/* bf16 weights with a Kahan compensation buffer: the fp32 working copy (load) and its
   write-back (store), one pass each, bit for bit as shardflow.ops.precision.working_copy and
   store_weight_(precision="kahan") compute them with torch ops (round to nearest even; a NaN
   stays a NaN). Loaded by shardflow/ops/native/kahan.py; built by shardflow/ops/native/build.py.

   Example shapes: a SmolLM2-135M embedding, n = 49152 * 576 = 28.3 M values per call. */

#include <stdint.h>
#include <string.h>

#ifndef PARALLEL_ELEMENTS
#error "PARALLEL_ELEMENTS is passed by the builder (-D)"
#endif

static inline float from_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((bits >> 16) | 0x0040u); /* NaN */
    bits += 0x7FFFu + ((bits >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(bits >> 16);
}

/* out = w + c (c may be NULL: out = w) */
void sfk_load(int64_t n, const uint16_t* w, const uint16_t* c, float* out) {
#pragma omp parallel for schedule(static) if (n > PARALLEL_ELEMENTS)
    for (int64_t i = 0; i < n; i++) out[i] = from_bf16(w[i]) + (c ? from_bf16(c[i]) : 0.0f);
}

/* w = round(x); c = round(x - w) (c may be NULL: round to nearest only) */
void sfk_store(int64_t n, const float* x, uint16_t* w, uint16_t* c) {
#pragma omp parallel for schedule(static) if (n > PARALLEL_ELEMENTS)
    for (int64_t i = 0; i < n; i++) {
        uint16_t r = to_bf16(x[i]);
        w[i] = r;
        if (c) c[i] = to_bf16(x[i] - from_bf16(r));
    }
}
