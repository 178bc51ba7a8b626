/* chatstream's kernels for block-quantized weights (GGUF's formats, see chatstream.engine.quant),
 * compiled at first use like ../kernels.c: plain C through ctypes, no Python or torch headers.
 *
 * Weights stay in blocks of 32 values, one fp16 scale `d` each and an offset `m`: value = d * u + m
 * with u unsigned, 4 bits (GGUF's Q4_0, Q4_1, Q4_K) or 8 bits (Q8_0, and what other types are
 * requantized to), in a tiled layout (below) made once at load time. Activations are quantized per
 * block of 32 as llama.cpp does (int8, one float scale, and the block's scaled sum, which the
 * offsets multiply), so every product is an integer dot product: AVX-512 VNNI's vpdpbusd on 16
 * channels at once where the compiler targets it, plain C loops (vectorised for AVX2 by the
 * compiler) elsewhere. The library is built with -march=native on the machine that runs it, so
 * the CPU's features pick the variant; `quant_isa` says which. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))
#define TILE 4

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QUANT_ISA 2
#elif defined(__AVX2__)
#define QUANT_ISA 1
#else
#define QUANT_ISA 0
#endif

/* Which variant was compiled: 2 AVX-512 VNNI, 1 AVX2 (the plain C tiles, vectorised by the
 * compiler for AVX2), 0 plain C. */
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

/* x [rows, k] (rows x_stride apart, k a multiple of 32) -> q [rows, k] int8, and per block of 32
 * its scale d = amax / 127 and s = d * sum(q) (what a 4-bit block's offset multiplies). */
void quantize_blocks(const float *restrict x, int64_t rows, int64_t k, int64_t x_stride, int8_t *restrict q,
                     float *restrict d, float *restrict s) {
    const int64_t nb = k / 32;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + r * x_stride + b * 32;
            int8_t *qb = q + r * k + b * 32;
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
            d[r * nb + b] = scale;
            s[r * nb + b] = scale * (float)sum;
        }
    }
}

/* ---- the tiled layout: 16 output channels side by side, block after block ----
 * Tile t holds channels 16t..16t+15 (zero-padded), its blocks in order; block b of a tile is the
 * 512 values of its 16 channels as VNNI wants them, groups of 4 consecutive values per channel:
 *   kind 8: [8 groups][16 channels][4] bytes, u = q + 128 (unsigned), so value = d * u + m with
 *           m = -128 d (computed here, not stored);
 *   kind 4: [4 groups][16 channels][4] bytes, low nibble group g (values 4g..4g+3 of the block),
 *           high nibble group g + 4 (values 16 + 4g..): byte j of a ggml Q4 block, moved.
 * d and m: fp16 [tiles][blocks][16]. Unsigned weights times signed int8 activations is exactly
 * vpdpbusd's operand order; each block's int32 sums then take one float multiply-add for the
 * scale and one for the offset, for 16 channels at once. */
#define BLOCK_BYTES(kind) ((kind) == 4 ? 256 : 512)

#if QUANT_ISA == 2
INLINE void tile_rows(int kind, const int R, const int8_t *restrict xq, const float *restrict xd,
                      const float *restrict xs, int64_t k, const uint8_t *restrict w, const uint16_t *restrict wd,
                      const uint16_t *restrict wm, __m512 *acc) {
    const int64_t nb = k / 32;
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * BLOCK_BYTES(kind);
        __m512i W[8];
        if (kind == 4) {
            const __m512i low = _mm512_set1_epi8(0x0f);
            for (int g = 0; g < 4; g++) {
                const __m512i v = _mm512_loadu_si512((const void *)(wb + 64 * g));
                W[g] = _mm512_and_si512(v, low);
                W[g + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
        } else {
            for (int g = 0; g < 8; g++) W[g] = _mm512_loadu_si512((const void *)(wb + 64 * g));
        }
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wd + b * 16)));
        const __m512 mv = kind == 4 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wm + b * 16)))
                                    : _mm512_mul_ps(dv, _mm512_set1_ps(-128.f));
        for (int r = 0; r < R; r++) {
            const int8_t *x = xq + r * k + b * 32;
            __m512i sum = _mm512_setzero_si512();
            for (int g = 0; g < 8; g++) {
                int32_t four;
                memcpy(&four, x + 4 * g, 4);
                sum = _mm512_dpbusd_epi32(sum, W[g], _mm512_set1_epi32(four));
            }
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dv, _mm512_set1_ps(xd[r * nb + b])), acc[r]);
            acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[r * nb + b]), acc[r]);
        }
    }
}
#endif

/* The same sums in plain C (what an AVX2-only or non-x86 build compiles; gcc vectorises it). */
static void tile_rows_c(int kind, int64_t rows, const int8_t *restrict xq, const float *restrict xd,
                        const float *restrict xs, int64_t k, const uint8_t *restrict w, const uint16_t *restrict wd,
                        const uint16_t *restrict wm, float *restrict acc /* [rows][16] */) {
    const int64_t nb = k / 32;
    memset(acc, 0, sizeof(float) * 16 * rows);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * BLOCK_BYTES(kind);
        uint8_t u[32][16]; /* [value in block][channel] */
        for (int g = 0; g < 8; g++)
            for (int c = 0; c < 16; c++)
                for (int kk = 0; kk < 4; kk++)
                    u[4 * g + kk][c] = kind == 4 ? (g < 4 ? wb[(g * 16 + c) * 4 + kk] & 0x0f
                                                          : wb[((g - 4) * 16 + c) * 4 + kk] >> 4)
                                                 : wb[(g * 16 + c) * 4 + kk];
        float d[16], m[16];
        for (int c = 0; c < 16; c++) {
            d[c] = half_to_float(wd[b * 16 + c]);
            m[c] = kind == 4 ? half_to_float(wm[b * 16 + c]) : -128.f * d[c];
        }
        for (int64_t r = 0; r < rows; r++) {
            const int8_t *x = xq + r * k + b * 32;
            int32_t sum[16] = {0};
            for (int i = 0; i < 32; i++)
#pragma omp simd
                for (int c = 0; c < 16; c++) sum[c] += (int32_t)u[i][c] * (int32_t)x[i];
            const float xdb = xd[r * nb + b], xsb = xs[r * nb + b];
#pragma omp simd
            for (int c = 0; c < 16; c++) acc[r * 16 + c] += (float)sum[c] * (d[c] * xdb) + m[c] * xsb;
        }
    }
}

INLINE void store_tile(const float *restrict v, int64_t c, int64_t n, const float *restrict bias, float *restrict o,
                       int accumulate) {
    for (int j = 0; j < 16 && c + j < n; j++) {
        float y = v[j] + (bias ? bias[c + j] : 0.f);
        o[c + j] = accumulate ? o[c + j] + y : y;
    }
}

/* out [rows, n] (rows out_stride apart) (+)= x . W^T (+ bias), W [n, k] tiled as above.
 * Returns 0, or -1 for a bad kind or k. */
int quant_linear(int kind, const int8_t *restrict xq, const float *restrict xd, const float *restrict xs,
                 int64_t rows, int64_t k, const uint8_t *restrict w, const uint16_t *restrict wd,
                 const uint16_t *restrict wm, int64_t n, const float *restrict bias, float *restrict out,
                 int64_t out_stride, int accumulate) {
    if ((kind != 4 && kind != 8) || k % 32 != 0) return -1;
    const int64_t nb = k / 32, tiles = (n + 15) / 16, tile_bytes = nb * BLOCK_BYTES(kind);
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *wt = w + t * tile_bytes;
        const uint16_t *dt = wd + t * nb * 16, *mt = kind == 4 ? wm + t * nb * 16 : NULL;
        for (int64_t r0 = 0; r0 < rows;) {
            const int64_t step = rows - r0 >= 4 ? 4 : 1;
            float v[4][16];
#if QUANT_ISA == 2
            __m512 acc[4];
            if (kind == 4) {
                if (step == 4) tile_rows(4, 4, xq + r0 * k, xd + r0 * nb, xs + r0 * nb, k, wt, dt, mt, acc);
                else tile_rows(4, 1, xq + r0 * k, xd + r0 * nb, xs + r0 * nb, k, wt, dt, mt, acc);
            } else {
                if (step == 4) tile_rows(8, 4, xq + r0 * k, xd + r0 * nb, xs + r0 * nb, k, wt, dt, mt, acc);
                else tile_rows(8, 1, xq + r0 * k, xd + r0 * nb, xs + r0 * nb, k, wt, dt, mt, acc);
            }
            for (int r = 0; r < step; r++) _mm512_storeu_ps(v[r], acc[r]);
#else
            tile_rows_c(kind, step, xq + r0 * k, xd + r0 * nb, xs + r0 * nb, k, wt, dt, mt, &v[0][0]);
#endif
            for (int r = 0; r < step; r++) store_tile(v[r], t * 16, n, bias, out + (r0 + r) * out_stride, accumulate);
            r0 += step;
        }
    }
    return 0;
}
