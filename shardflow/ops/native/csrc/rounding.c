/* Stochastic rounding of many fp32 tensors to bf16 in one call, bit for bit as
   shardflow.ops.precision.bf16_stochastic. Loaded by shardflow/ops/native/rounding.py; built by
   shardflow/ops/native/build.py. */

#include <stdint.h>
#include <string.h>

typedef struct {
    uint16_t* dst;     /* bf16 bits */
    const float* src;
    int64_t n, offset;
    uint32_t key;
} Piece;

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

int32_t sfr_version(void) { return 1; }

void sfr_bf16_many(int64_t n, const Piece* pieces) {
    for (int64_t k = 0; k < n; k++) {
        const Piece* p = &pieces[k];
        for (int64_t i = 0; i < p->n; i++) {
            uint32_t bits;
            memcpy(&bits, &p->src[i], sizeof bits);
            uint32_t noise = lowbias32((uint32_t)(i + p->offset) ^ p->key) & 0xFFFFu;
            uint32_t r = (bits + noise) & 0xFFFF0000u;
            int nan = (r & 0x7F800000u) == 0x7F800000u && (r & 0x007F0000u) != 0;
            p->dst[i] = nan ? 0xFFFFu : (uint16_t)(r >> 16);
        }
    }
}
