/* chatstream's kernels for block-quantized weights (GGUF's formats, see chatstream.engine.quant),
 * compiled at first use like ../ops/kernels.c: plain C through ctypes, no Python or torch headers.
 *
 * Weights stay in blocks of 32 values, one fp16 scale `d` each and an offset `m`: value = d * u + m
 * with u unsigned, 4 bits (GGUF's Q4_0, Q4_1, Q4_K) or 8 bits (Q8_0, and what other types are
 * requantized to), in a tiled layout (below) made once at load time. Activations are quantized
 * once per row, per block of 32, as llama.cpp's Q8_0 does (int8, one float scale, and the block's
 * scaled sum, which the offsets multiply), so every product is an integer dot product of 32 pairs
 * and one float multiply-add per block: AVX-512 VNNI's vpdpbusd on 16 channels at once, AVX2's
 * maddubs + madd on 8, plain C elsewhere. The library is built with -march=native on the machine
 * that runs it, so the CPU's features pick the variant; `quant_isa` says which.
 *
 * A product is split across threads by output channels (16 at a time), and each thread runs the
 * rows in chunks of up to 16 over every block of weights it unpacked: at 16 rows a weight byte
 * read from memory feeds 16 rows of arithmetic (weight-stationary), which makes a batch of 16
 * compute-bound rather than memory-bound. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))
#include "../ops/thread_pool.h"  /* pool_run */
#include "../ops/vector_math.h" /* exp_approx, rms_norm_row */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QUANT_ISA 2
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QUANT_ISA 1
#else
#define QUANT_ISA 0
#endif

/* Which variant was compiled: 2 AVX-512 VNNI, 1 AVX2 (maddubs + madd), 0 plain C. */
int quant_isa(void) { return QUANT_ISA; }


INLINE float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) bits = sign;
        else { /* subnormal: normalise */
            int e = -1;
            uint32_t m = mant;
            do { e++; m <<= 1; } while (!(m & 0x400));
            bits = sign | (uint32_t)(112 - e) << 23 | (m & 0x3ff) << 13;
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | mant << 13;
    else bits = sign | (exp + 112) << 23 | mant << 13;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* One row -> int8 per block of 32, and per block its scale d = amax / 127 and s = d * sum(q). */
INLINE void quantize_row(const float *restrict xr, int64_t nb, int8_t *restrict qr, float *restrict dr,
                         float *restrict sr) {
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = xr + b * 32;
        int8_t *qb = qr + b * 32;
        float amax = 0.f;
#pragma omp simd reduction(max : amax)
        for (int i = 0; i < 32; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
        const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < 32; i++) {
            const int32_t v = (int32_t)nearbyintf(xb[i] * inv);
            qb[i] = (int8_t)v;
            sum += v;
        }
        dr[b] = scale;
        sr[b] = scale * (float)sum;
    }
}

/* x [rows, k] (rows x_stride apart, k a multiple of 32) -> q [rows, k] int8, d and s [rows, k / 32]. */
void quantize_blocks(const float *restrict x, int64_t rows, int64_t k, int64_t x_stride, int8_t *restrict q,
                     float *restrict d, float *restrict s) {
    const int64_t nb = k / 32;
    for (int64_t r = 0; r < rows; r++) quantize_row(x + r * x_stride, nb, q + r * k, d + r * nb, s + r * nb);
}

/* RMSNorm (x / sqrt(mean(x^2) + eps) * weight) of rows [rows, k] (contiguous), then quantize_blocks;
 * `work` holds k floats. One call where PyTorch took an operator and a float32 copy between them. */
void rms_norm_quantize_blocks(const float *restrict x, int64_t rows, int64_t k, const float *restrict weight,
                              float eps, float *restrict work, int8_t *restrict q, float *restrict d,
                              float *restrict s) {
    const int64_t nb = k / 32;
    for (int64_t r = 0; r < rows; r++) {
        rms_norm_row(x + r * k, k, weight, eps, work);
        quantize_row(work, nb, q + r * k, d + r * nb, s + r * nb);
    }
}


/* silu(gate) * up for rows of [gate | up] (each `width` wide, rows 2 * width apart), then
 * quantize_blocks; `work` holds `width` floats. */
void silu_mul_quantize_blocks(const float *restrict gate_up, int64_t rows, int64_t width, float *restrict work,
                              int8_t *restrict q, float *restrict d, float *restrict s) {
    const int64_t nb = width / 32;
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * width, *u = g + width;
#pragma omp simd
        for (int64_t i = 0; i < width; i++) work[i] = g[i] / (1.f + exp_approx(-g[i])) * u[i];
        quantize_row(work, nb, q + r * width, d + r * nb, s + r * nb);
    }
}

/* ---- the tiled layout: 16 output channels side by side, block after block ----
 * Tile t holds channels 16t..16t+15 (zero-padded), its blocks in order; block b of a tile is the
 * 512 values of its 16 channels as VNNI wants them, groups of 4 consecutive values per channel:
 *   kind 8: [8 groups][16 channels][4] bytes, u = q + 128 (unsigned), so value = d * u + m with
 *           m = -128 d (computed here, not stored);
 *   kind 4: [4 groups][16 channels][4] bytes, low nibble group g (values 4g..4g+3 of the block),
 *           high nibble group g + 4 (values 16 + 4g..): byte j of a ggml Q4 block, moved.
 *   kind 5 (GGUF's Q4_K): kind 4's bytes, with d and m as the file's integers (below);
 *   kind 6 (GGUF's Q6_K as stored): u's low 4 bits as kind 4's (256 bytes), then its high 2 bits
 *           in two vectors [16 channels][4] (128 bytes): bits 2g of vector h are group 4h + g's.
 * d and m: fp16 [tiles][blocks][16]; kind 5: d the uint8 sub-scales and mins [tiles][blocks][2][16],
 * m the fp16 super-block scale and -min scale [tiles][blocks / 8][2][16] (block scale = sub-scale
 * x scale, offset = min x -min scale: the file's values exactly, 0.578 bytes a weight); kind 6: d the int8 sub-scales [tiles][blocks][2][16] (values
 * 0-15 and 16-31 of a block), m the fp16 super-block scales [tiles][blocks / 8][16], and
 * value = m * d * (u - 32): its -32 is the activations' sum per 16 times -32, the sums' start.
 * Unsigned weights times signed int8 activations is exactly vpdpbusd's (and maddubs') operand
 * order; each block's int32 sums then take one float multiply-add for the scale and one for the
 * offset, for 16 channels at once. */
#define BLOCK_BYTES(kind) ((kind) == 4 || (kind) == 5 ? 256 : (kind) == 6 ? 384 : 512)
#define NIBBLES(kind) ((kind) == 4 || (kind) == 5)
#define MAX_ROWS 16 /* rows a tile's unpacked block is used for (16 accumulators + 8 weights in zmm) */
#define PREFETCH_AHEAD 4 /* blocks */

typedef struct {
    int kind;
    const int8_t *xq; /* block-major: [nb][rows][32] */
    const float *xd, *xs; /* [nb][rows] */
    const int32_t *xo;    /* kind 6: -32 * the sum of each 16 activations, [nb][rows][2] */
    int64_t rows, k, nb;
    const uint8_t *w;
    const uint16_t *wd, *wm;
    int64_t n;
    const float *bias;
    float *out;
    int64_t out_stride;
    int accumulate;
} product_t;

INLINE void store_tile(const float *restrict v, int64_t c, int64_t n, const float *restrict bias, float *restrict o,
                       int accumulate) {
    for (int j = 0; j < 16 && c + j < n; j++) {
        float y = v[j] + (bias ? bias[c + j] : 0.f);
        o[c + j] = accumulate ? o[c + j] + y : y;
    }
}

#if QUANT_ISA == 2
/* R rows (R a constant once inlined) x one tile: each block is unpacked once into 8 registers of
 * 64 bytes, then used by the rows in groups of up to 8. Within a group the 8 dot products of each
 * row are interleaved across the rows (group-major), so a row's chain of dependent vpdpbusd
 * (latency 5) always has the other rows' independent ones to overlap with; a row at a time, the
 * chain bound a block to ~2.7 cycles per vpdpbusd. The float accumulators live in `v` (L1), not
 * in registers: with 8 weights and 8 sums held, 16 more spilled anyway (in memory: 16 rows of
 * [2048, 8192], Q4_1 103 -> 119, Q4_K 97 -> 107, Q8_0 96 -> 106 GMAC/s a core, A/B in one run). */
INLINE void tile_rows(const int kind, const int R, const product_t *p, const uint8_t *restrict w,
                      const uint16_t *restrict wd, const uint16_t *restrict wm, int64_t r0, float *restrict v) {
    const int64_t nb = p->nb, rows = p->rows;
    const int8_t *xq = p->xq + r0 * 32;
    const float *xd = p->xd + r0, *xs = p->xs + r0;
    float *acc = v; /* [R][16], in L1: the registers hold the block's weights and 8 rows' sums */
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) _mm512_storeu_ps(acc + 16 * r, _mm512_setzero_ps());
    __m512 dsup = _mm512_setzero_ps(), msup = _mm512_setzero_ps(); /* kind 5's super-block scales */
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * BLOCK_BYTES(kind);
        /* Tiles follow each other in memory: the next blocks (of this tile or the next) are
         * fetched while these compute. */
        for (int line = 0; line < BLOCK_BYTES(kind); line += 64)
            __builtin_prefetch(wb + PREFETCH_AHEAD * BLOCK_BYTES(kind) + line, 0, 3);
        __m512i W[8];
        if (NIBBLES(kind)) {
            const __m512i low = _mm512_set1_epi8(0x0f);
#pragma GCC unroll 4
            for (int g = 0; g < 4; g++) {
                const __m512i x = _mm512_loadu_si512((const void *)(wb + 64 * g));
                W[g] = _mm512_and_si512(x, low);
                W[g + 4] = _mm512_and_si512(_mm512_srli_epi16(x, 4), low);
            }
        } else {
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) W[g] = _mm512_loadu_si512((const void *)(wb + 64 * g));
        }
        __m512 dv, mv;
        if (kind == 5) {
            if (b % 8 == 0) {
                dsup = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wm + b / 8 * 32)));
                msup = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wm + b / 8 * 32 + 16)));
            }
            const uint8_t *s8 = (const uint8_t *)wd + b * 32;
            dv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)s8))), dsup);
            mv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s8 + 16)))), msup);
        } else {
            dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wd + b * 16)));
            mv = kind == 4 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wm + b * 16)))
                           : _mm512_mul_ps(dv, _mm512_set1_ps(-128.f));
        }
#pragma GCC unroll 2
        for (int h = 0; h < R; h += 8) {
            const int H = R - h < 8 ? R - h : 8;
            __m512i sum[8];
#pragma GCC unroll 8
            for (int r = 0; r < H; r++)
                sum[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), W[0],
                                             _mm512_set1_epi32(*(const int32_t *)(xq + b * rows * 32 + (h + r) * 32)));
#pragma GCC unroll 8
            for (int g = 1; g < 8; g++)
#pragma GCC unroll 8
                for (int r = 0; r < H; r++)
                    sum[r] = _mm512_dpbusd_epi32(sum[r], W[g],
                                                 _mm512_set1_epi32(*(const int32_t *)(xq + b * rows * 32 + (h + r) * 32 + 4 * g)));
#pragma GCC unroll 8
            for (int r = 0; r < H; r++) {
                const int64_t i = b * rows + h + r;
                __m512 a = _mm512_loadu_ps(acc + 16 * (h + r));
                a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_mul_ps(dv, _mm512_set1_ps(xd[i])), a);
                _mm512_storeu_ps(acc + 16 * (h + r), _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[i]), a));
            }
        }
    }
}
/* Kind 6 (Q6_K): u = low nibble | high 2 bits << 4, each group's built with one ternary-logic op;
 * each block's two halves keep their own int32 sums (their sub-scales differ), which start at the
 * activations' -32 * sum, so the products are of u - 32. */
INLINE void tile_rows6(const int R, const product_t *p, const uint8_t *restrict w, const int8_t *restrict sc,
                       const uint16_t *restrict ds, int64_t r0, float *restrict v) {
    const int64_t nb = p->nb, rows = p->rows;
    const int8_t *xq = p->xq + r0 * 32;
    const float *xd = p->xd + r0;
    const int32_t *xo = p->xo + r0 * 2;
    const __m512i low = _mm512_set1_epi8(0x0f), high = _mm512_set1_epi8(0x30);
    float *acc = v; /* [R][16], in L1 (as tile_rows') */
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) _mm512_storeu_ps(acc + 16 * r, _mm512_setzero_ps());
    __m512 dsv = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * 384;
        for (int line = 0; line < 384; line += 64) __builtin_prefetch(wb + PREFETCH_AHEAD * 384 + line, 0, 3);
        if (b % 8 == 0) dsv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ds + b / 8 * 16)));
        __m512i W[8];
        const __m512i H[2] = {_mm512_loadu_si512((const void *)(wb + 256)), _mm512_loadu_si512((const void *)(wb + 320))};
#pragma GCC unroll 4
        for (int g = 0; g < 4; g++) {
            const __m512i x = _mm512_loadu_si512((const void *)(wb + 64 * g));
            const __m512i lo[2] = {_mm512_and_si512(x, low), _mm512_and_si512(_mm512_srli_epi16(x, 4), low)};
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const __m512i hi = g == 0 ? _mm512_slli_epi16(H[h], 4) : g == 1 ? _mm512_slli_epi16(H[h], 2)
                                 : g == 2 ? H[h] : _mm512_srli_epi16(H[h], 2);
                W[4 * h + g] = _mm512_ternarylogic_epi32(hi, high, lo[h], 0xEA); /* (hi & high) | lo */
            }
        }
        const __m512 sa = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sc + b * 32)))), dsv);
        const __m512 sb = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sc + b * 32 + 16)))), dsv);
#pragma GCC unroll 2
        for (int h = 0; h < R; h += 8) {
            const int G = R - h < 8 ? R - h : 8;
            __m512i sum[2][8];
#pragma GCC unroll 8
            for (int r = 0; r < G; r++) {
                sum[0][r] = _mm512_set1_epi32(xo[(b * rows + h + r) * 2]);
                sum[1][r] = _mm512_set1_epi32(xo[(b * rows + h + r) * 2 + 1]);
            }
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++)
#pragma GCC unroll 8
                for (int r = 0; r < G; r++)
                    sum[g / 4][r] = _mm512_dpbusd_epi32(sum[g / 4][r], W[g],
                                                        _mm512_set1_epi32(*(const int32_t *)(xq + b * rows * 32 + (h + r) * 32 + 4 * g)));
#pragma GCC unroll 8
            for (int r = 0; r < G; r++) {
                const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[1][r]), sb, _mm512_mul_ps(_mm512_cvtepi32_ps(sum[0][r]), sa));
                _mm512_storeu_ps(acc + 16 * (h + r),
                                 _mm512_fmadd_ps(t, _mm512_set1_ps(xd[b * rows + h + r]), _mm512_loadu_ps(acc + 16 * (h + r))));
            }
        }
    }
}
#elif QUANT_ISA == 1
/* AVX2: a tile is two halves of 8 channels; each group of 4 values is unpacked once and used for
 * the R rows. maddubs multiplies unsigned by signed bytes into saturating 16-bit pairs: 4-bit
 * weights (u <= 15) cannot saturate; 8-bit ones go in signed (q = u - 128, |q| <= 128) with the
 * activation's sign moved onto them, llama.cpp's trick, so no pair exceeds 2 * 128 * 127. */
INLINE void tile_rows(const int kind, const int R, const product_t *p, const uint8_t *restrict w,
                      const uint16_t *restrict wd, const uint16_t *restrict wm, int64_t r0, float *restrict v) {
    const int64_t nb = p->nb, rows = p->rows;
    const int8_t *xq = p->xq + r0 * 32;
    const float *xd = p->xd + r0, *xs = p->xs + r0;
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    __m256 acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * BLOCK_BYTES(kind);
        for (int line = 0; line < BLOCK_BYTES(kind); line += 64)
            __builtin_prefetch(wb + PREFETCH_AHEAD * BLOCK_BYTES(kind) + line, 0, 3);
        __m256i sum[R][2];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) sum[r][0] = sum[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            __m256i W[2];
            for (int h = 0; h < 2; h++) {
                if (NIBBLES(kind)) {
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(wb + 64 * (g & 3) + 32 * h));
                    W[h] = _mm256_and_si256(g < 4 ? x : _mm256_srli_epi16(x, 4), low);
                } else {
                    W[h] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + 64 * g + 32 * h)), flip);
                }
            }
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                int32_t four;
                memcpy(&four, xq + b * rows * 32 + r * 32 + 4 * g, 4);
                const __m256i x = _mm256_set1_epi32(four);
                for (int h = 0; h < 2; h++) {
                    const __m256i pairs = NIBBLES(kind) ? _mm256_maddubs_epi16(W[h], x)
                                                    : _mm256_maddubs_epi16(_mm256_abs_epi8(W[h]), _mm256_sign_epi8(x, W[h]));
                    sum[r][h] = _mm256_add_epi32(sum[r][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            __m256 dv, mv;
            if (kind == 5) {
                const uint8_t *s8 = (const uint8_t *)wd + b * 32 + 8 * h;
                dv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)s8))),
                                   _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + b / 8 * 32 + 8 * h))));
                mv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(s8 + 16)))),
                                   _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + b / 8 * 32 + 16 + 8 * h))));
            } else {
                dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b * 16 + 8 * h)));
                mv = kind == 4 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + b * 16 + 8 * h)))
                               : _mm256_setzero_ps(); /* signed q: no offset */
            }
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][h]), _mm256_mul_ps(dv, _mm256_set1_ps(xd[b * rows + r])),
                                            acc[r][h]);
                if (NIBBLES(kind)) acc[r][h] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[b * rows + r]), acc[r][h]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(v + 16 * r, acc[r][0]);
        _mm256_storeu_ps(v + 16 * r + 8, acc[r][1]);
    }
}
/* Kind 6 (Q6_K), AVX2: as the AVX-512 variant, 8 channels a half; u <= 63, so maddubs's pairs
 * (<= 2 * 63 * 128) cannot saturate. */
INLINE void tile_rows6(const int R, const product_t *p, const uint8_t *restrict w, const int8_t *restrict sc,
                       const uint16_t *restrict ds, int64_t r0, float *restrict v) {
    const int64_t nb = p->nb, rows = p->rows;
    const int8_t *xq = p->xq + r0 * 32;
    const float *xd = p->xd + r0;
    const int32_t *xo = p->xo + r0 * 2;
    const __m256i low = _mm256_set1_epi8(0x0f), high = _mm256_set1_epi8(0x30), ones = _mm256_set1_epi16(1);
    __m256 acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * 384;
        for (int line = 0; line < 384; line += 64) __builtin_prefetch(wb + PREFETCH_AHEAD * 384 + line, 0, 3);
        __m256i sum[R][2][2]; /* [row][half of the block][half of the channels] */
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            for (int a = 0; a < 2; a++) sum[r][a][0] = sum[r][a][1] = _mm256_set1_epi32(xo[(b * rows + r) * 2 + a]);
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            __m256i W[2];
            for (int h = 0; h < 2; h++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(wb + 64 * (g & 3) + 32 * h));
                const __m256i lo = _mm256_and_si256(g < 4 ? x : _mm256_srli_epi16(x, 4), low);
                const __m256i H = _mm256_loadu_si256((const __m256i *)(wb + 256 + 64 * (g >> 2) + 32 * h));
                const int s = g & 3;
                const __m256i hi = s == 0 ? _mm256_slli_epi16(H, 4) : s == 1 ? _mm256_slli_epi16(H, 2)
                                 : s == 2 ? H : _mm256_srli_epi16(H, 2);
                W[h] = _mm256_or_si256(_mm256_and_si256(hi, high), lo);
            }
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                int32_t four;
                memcpy(&four, xq + b * rows * 32 + r * 32 + 4 * g, 4);
                const __m256i x = _mm256_set1_epi32(four);
                for (int h = 0; h < 2; h++)
                    sum[r][g >> 2][h] = _mm256_add_epi32(sum[r][g >> 2][h], _mm256_madd_epi16(_mm256_maddubs_epi16(W[h], x), ones));
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 dsv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ds + b / 8 * 16 + 8 * h)));
            const __m256 sa = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sc + b * 32 + 8 * h)))), dsv);
            const __m256 sb = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sc + b * 32 + 16 + 8 * h)))), dsv);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][1][h]), sb, _mm256_mul_ps(_mm256_cvtepi32_ps(sum[r][0][h]), sa));
                acc[r][h] = _mm256_fmadd_ps(t, _mm256_set1_ps(xd[b * rows + r]), acc[r][h]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(v + 16 * r, acc[r][0]);
        _mm256_storeu_ps(v + 16 * r + 8, acc[r][1]);
    }
}
#else
/* Plain C (a CPU without AVX2): the same sums, one row at a time. */
INLINE void tile_rows(const int kind, const int R, const product_t *p, const uint8_t *restrict w,
                      const uint16_t *restrict wd, const uint16_t *restrict wm, int64_t r0, float *restrict v) {
    const int64_t nb = p->nb;
    memset(v, 0, sizeof(float) * 16 * R);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * BLOCK_BYTES(kind);
        uint8_t u[32][16]; /* [value in block][channel] */
        for (int g = 0; g < 8; g++)
            for (int c = 0; c < 16; c++)
                for (int kk = 0; kk < 4; kk++)
                    u[4 * g + kk][c] = NIBBLES(kind) ? (g < 4 ? wb[(g * 16 + c) * 4 + kk] & 0x0f
                                                          : wb[((g - 4) * 16 + c) * 4 + kk] >> 4)
                                                 : wb[(g * 16 + c) * 4 + kk];
        float d[16], m[16];
        for (int c = 0; c < 16; c++) {
            if (kind == 5) {
                const uint8_t *s8 = (const uint8_t *)wd + b * 32;
                d[c] = (float)s8[c] * half_to_float(wm[b / 8 * 32 + c]);
                m[c] = (float)s8[16 + c] * half_to_float(wm[b / 8 * 32 + 16 + c]);
                continue;
            }
            d[c] = half_to_float(wd[b * 16 + c]);
            m[c] = kind == 4 ? half_to_float(wm[b * 16 + c]) : -128.f * d[c];
        }
        for (int r = 0; r < R; r++) {
            const int8_t *x = p->xq + (b * p->rows + r0 + r) * 32;
            int32_t sum[16] = {0};
            for (int i = 0; i < 32; i++)
                for (int c = 0; c < 16; c++) sum[c] += (int32_t)u[i][c] * (int32_t)x[i];
            const float xdb = p->xd[b * p->rows + r0 + r], xsb = p->xs[b * p->rows + r0 + r];
            for (int c = 0; c < 16; c++) v[r * 16 + c] += (float)sum[c] * (d[c] * xdb) + m[c] * xsb;
        }
    }
}

/* Kind 6 (Q6_K), plain C. */
INLINE void tile_rows6(const int R, const product_t *p, const uint8_t *restrict w, const int8_t *restrict sc,
                       const uint16_t *restrict ds, int64_t r0, float *restrict v) {
    const int64_t nb = p->nb;
    memset(v, 0, sizeof(float) * 16 * R);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * 384;
        uint8_t u[32][16];
        for (int g = 0; g < 8; g++)
            for (int c = 0; c < 16; c++)
                for (int kk = 0; kk < 4; kk++) {
                    const uint8_t l = wb[((g & 3) * 16 + c) * 4 + kk], h = wb[256 + ((g >> 2) * 16 + c) * 4 + kk];
                    u[4 * g + kk][c] = (uint8_t)((g < 4 ? l & 0x0f : l >> 4) | ((h >> (2 * (g & 3))) & 3) << 4);
                }
        float sa[16], sb[16];
        for (int c = 0; c < 16; c++) {
            const float d = half_to_float(ds[b / 8 * 16 + c]);
            sa[c] = (float)sc[b * 32 + c] * d;
            sb[c] = (float)sc[b * 32 + 16 + c] * d;
        }
        for (int r = 0; r < R; r++) {
            const int8_t *x = p->xq + (b * p->rows + r0 + r) * 32;
            const int32_t *o = p->xo + (b * p->rows + r0 + r) * 2;
            int32_t sum[2][16];
            for (int c = 0; c < 16; c++) sum[0][c] = o[0], sum[1][c] = o[1];
            for (int i = 0; i < 32; i++)
                for (int c = 0; c < 16; c++) sum[i / 16][c] += (int32_t)u[i][c] * (int32_t)x[i];
            const float xdb = p->xd[b * p->rows + r0 + r];
            for (int c = 0; c < 16; c++) v[r * 16 + c] += ((float)sum[0][c] * sa[c] + (float)sum[1][c] * sb[c]) * xdb;
        }
    }
}
#endif

/* Tiles [t0, t1) for every row. Rows go in chunks of 16, 8, 4, 2, 1 (the accumulators of a chunk
 * fit the registers), each chunk over the whole tile: the tile (k / 32 blocks, a few KB) stays in
 * L1/L2 after the first chunk pulled it from memory. */
#define RUN(KIND, R) tile_rows(KIND, R, p, wt, dt, mt, r0, &v[0][0])
static void run_tiles(const product_t *p, int64_t t0, int64_t t1, int64_t rows) {
    const int64_t nb = p->nb;
    float v[MAX_ROWS][16];
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *wt = p->w + t * nb * BLOCK_BYTES(p->kind);
        const uint16_t *dt = p->wd + t * nb * 16, *mt = p->kind == 4 ? p->wm + t * nb * 16 : NULL; /* kinds 4, 8 */
        if (p->kind == 5) dt = (const uint16_t *)((const uint8_t *)p->wd + t * nb * 32), mt = p->wm + t * (nb / 8) * 32;
        for (int64_t r0 = 0; r0 < rows;) {
            const int64_t left = rows - r0;
            const int R = left >= 16 ? 16 : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            if (p->kind == 6) {
                const int8_t *st = (const int8_t *)p->wd + t * nb * 32;
                const uint16_t *ds = p->wm + t * (nb / 8) * 16;
                if (R == 16) tile_rows6(16, p, wt, st, ds, r0, &v[0][0]);
                else if (R == 8) tile_rows6(8, p, wt, st, ds, r0, &v[0][0]);
                else if (R == 4) tile_rows6(4, p, wt, st, ds, r0, &v[0][0]);
                else if (R == 2) tile_rows6(2, p, wt, st, ds, r0, &v[0][0]);
                else tile_rows6(1, p, wt, st, ds, r0, &v[0][0]);
            } else if (p->kind == 4) {
                if (R == 16) RUN(4, 16); else if (R == 8) RUN(4, 8); else if (R == 4) RUN(4, 4);
                else if (R == 2) RUN(4, 2); else RUN(4, 1);
            } else if (p->kind == 5) {
                if (R == 16) RUN(5, 16); else if (R == 8) RUN(5, 8); else if (R == 4) RUN(5, 4);
                else if (R == 2) RUN(5, 2); else RUN(5, 1);
            } else {
                if (R == 16) RUN(8, 16); else if (R == 8) RUN(8, 8); else if (R == 4) RUN(8, 4);
                else if (R == 2) RUN(8, 2); else RUN(8, 1);
            }
            for (int r = 0; r < R; r++) store_tile(v[r], t * 16, p->n, p->bias, p->out + (r0 + r) * p->out_stride, p->accumulate);
            r0 += R;
        }
    }
}
#undef RUN

/* ---- threads: the process's one pool (../thread_pool.h) ---- */
static pool_run_fn parallel_run = pool_run; /* this library's own, until quant_use_pool hands over kernels.c's */

/* Run products on `run` (kernels.c's chatstream_pool_run, so the process has one pool; NULL: this library's). */
void quant_use_pool(pool_run_fn run) { parallel_run = run != NULL ? run : pool_run; }

/* Helper threads this library's own pool started (0 while it runs on kernels.c's). */
int64_t quant_own_pool_threads(void) { return pool.started; }

typedef struct {
    const product_t *p;
    int64_t rows;
} tiles_job_t;

static void run_tiles_task(const void *ctx, int64_t t0, int64_t t1) {
    const tiles_job_t *job = ctx;
    run_tiles(job->p, t0, t1, job->rows);
}

/* The calling thread's buffer for the block-major activations (grown, never shrunk). */
static _Thread_local struct { void *data; int64_t size; } scratch;

static int ensure_scratch(int64_t bytes) {
    if (scratch.size >= bytes) return 0;
    free(scratch.data);
    scratch.data = aligned_alloc(64, (size_t)((bytes + 63) / 64 * 64));
    scratch.size = scratch.data ? bytes : 0;
    return scratch.data ? 0 : -1;
}

/* out [rows, n] (rows out_stride apart) (+)= x . W^T (+ bias), W [n, k] tiled as above, split by
 * tiles of 16 output channels across up to `threads` threads (PyTorch's count, passed by the
 * caller; a product of under ~1M multiply-adds stays on the caller's, where waking a helper would
 * cost more than it saves). Several rows are first copied block-major ([block][row][32]): a block's
 * rows then lie side by side behind one pointer, where rows k bytes apart (k = 8192: the same L1
 * set for all 16) took a pointer register each and evicted each other (16 x 8192 measured 1.44x
 * slower, 69 against 100 GMAC/s a core). Returns 0, -1 for a bad kind or k, -2 without memory. */
int quant_linear(int kind, const int8_t *restrict xq, const float *restrict xd, const float *restrict xs,
                 int64_t rows, int64_t k, const uint8_t *restrict w, const uint16_t *restrict wd,
                 const uint16_t *restrict wm, int64_t n, const float *restrict bias, float *restrict out,
                 int64_t out_stride, int accumulate, int threads) {
    if (kind < 4 || kind > 8 || kind == 7 || k % (kind == 5 || kind == 6 ? 256 : 32) != 0) return -1;
    const int64_t nb = k / 32;
    int32_t *xo = NULL;
    if (rows > 1 || kind == 6) { /* block-major copy: a block's rows side by side, one pointer for all of them */
        const int64_t offsets = kind == 6 ? 2 * rows * nb : 0;
        if (ensure_scratch(rows * k + (2 * rows * nb + offsets) * 4) != 0) return -2;
        int8_t *bq = (int8_t *)scratch.data;
        float *bd = (float *)(bq + rows * k), *bs = bd + rows * nb;
        xo = kind == 6 ? (int32_t *)(bs + rows * nb) : NULL;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t b = 0; b < nb; b++) {
                const int8_t *x = xq + r * k + b * 32;
                memcpy(bq + (b * rows + r) * 32, x, 32);
                bd[b * rows + r] = xd[r * nb + b];
                bs[b * rows + r] = xs[r * nb + b];
                if (xo) {
                    int32_t a = 0, c = 0;
                    for (int i = 0; i < 16; i++) a += x[i], c += x[16 + i];
                    xo[(b * rows + r) * 2] = -32 * a, xo[(b * rows + r) * 2 + 1] = -32 * c;
                }
            }
        xq = bq, xd = bd, xs = bs;
    }
    const product_t p = {kind, xq, xd, xs, xo, rows, k, nb, w, wd, wm, n, bias, out, out_stride, accumulate};
    const int64_t tiles = (n + 15) / 16;
    if (rows * n * k < (1 << 20)) threads = 1;
    if (threads > tiles) threads = (int)tiles;
    if (threads <= 1) run_tiles(&p, 0, tiles, rows);
    else parallel_run(run_tiles_task, &(tiles_job_t){&p, rows}, tiles, 0, threads);
    return 0;
}
