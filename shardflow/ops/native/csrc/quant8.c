/* The 8-bit state: quantize, dequantize, and DolphinFlow's fused step on 8-bit moments
   (dequantize, DolphinFlow's rule from dolphinflow_rule.h, requantize: one pass).
   Loaded by shardflow/ops/native/quant8.py (its docstring: the nearest-code arithmetic and the
   three builds). Built by shardflow/ops/native/build.py, once per instruction set (AVX2;
   AVX-512 with -mavx512f...; AVX-512 VBMI), with these macros on the command line:
     HEAD, TAIL         values per head block and per tail block of a row (quant8.py's
                        HEAD_BLOCK, TAIL_BLOCK; multiples of 64, the values decoded at once)
     PARALLEL_ELEMENTS  below this many values a loop runs on the calling thread */

#if !defined(HEAD) || !defined(TAIL)
#error "HEAD and TAIL come from the builder: -DHEAD=... -DTAIL=... (shardflow/ops/native/quant8.py)"
#endif
#ifndef PARALLEL_ELEMENTS
#error "PARALLEL_ELEMENTS comes from the builder (shardflow/ops/native/build.py)"
#endif

#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

_Static_assert(HEAD % 64 == 0 && TAIL % 64 == 0, "blocks are whole runs of 64 values");
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

#include "dolphinflow_rule.h"

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

int32_t sf8_version(void) { return 4; }
int32_t sf8_lanes(void) { return W; }

/* weights and gradients are read 4 KiB ahead (a loop this busy keeps too few loads in flight
   to stream a matrix that is not in cache; as factored_native's) */
#define AHEAD 1024

void sf8_step_rows(int64_t r0, int64_t r1, float* w, const float* g, int64_t cols,
                   int64_t code_cols, int64_t head_blocks, int64_t blocks, uint8_t* mc, float* ms,
                   uint8_t* vc, float* vs, const float* fa, const float* fb, int64_t fold_stride,
                   const DFRule* R, const Map* mm, const Map* vm) {
    /* locals, not loads through R, mm, vm in the loop (a store to a float buffer may alias them) */
    const DFConst rule = df_const(R);
    const int nesterov = R->nesterov, folded = fa != 0;
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
                /* DolphinFlow's rule (dolphinflow_rule.h), always adaptive here */
                vf u = df_direction(df_grad(g0, w0, a, b, &rule, folded), &m, &v, &rule, nesterov, 1);
                VSTORE(wb + j, df_apply(w0, u, &rule));
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
