/* chatstream's kernels for block-quantized weights (GGUF's formats, see chatstream.engine.quant),
 * compiled at first use like ../kernels.c: plain C through ctypes, no Python or torch headers.
 *
 * Weights stay in blocks of 32 values, one fp16 scale `d` each (and one fp16 offset `m` for the
 * 4-bit kind): value = d * q + m. Two kinds cover the GGUF formats:
 *   kind 4: q in [0, 15], two per byte (byte j of a block: value j low nibble, value j + 16 high),
 *           the layout of ggml's Q4_0/Q4_1; Q4_0 is m = -8 d, Q4_K is d = d * scale, m = -dmin * min;
 *   kind 8: q in [-127, 127], one signed byte each (ggml's Q8_0), m = 0.
 * Activations are quantized per block of 32 as llama.cpp does (int8, one float scale, and the
 * block's scaled sum for the 4-bit offsets), so every product is an integer dot product of 32
 * bytes: AVX-512 VNNI's vpdpbusd (256-bit, AVX512VL) where the compiler targets it, AVX2's
 * vpmaddubsw + vpmaddwd otherwise, plain C elsewhere. The library is built with -march=native on
 * the machine that runs it, so the CPU's features pick the variant; `quant_isa` says which.
 *
 * Each call computes a tile of 4 output channels at a time: their blocks are unpacked once into
 * a small buffer (bytes and float scales, in L1), then every activation row is dotted with the 4,
 * so a weight is read from memory once per step whatever the batch. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))
#define TILE 4

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define QUANT_ISA 2
INLINE __m256i dot32(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
#elif defined(__AVX2__)
#define QUANT_ISA 1
/* |u| <= 127 (kind 8 after the sign trick) or <= 15 (kind 4): pairs never saturate int16. */
INLINE __m256i dot32(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#else
#define QUANT_ISA 0
#endif

/* Which variant was compiled: 2 AVX-512 VNNI, 1 AVX2, 0 plain C. */
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

/* One output channel's blocks unpacked: bytes (kind 4: q; kind 8: |q|, with q's signs in `sign`),
 * scales and offsets as floats. */
static void unpack_row(int kind, const uint8_t *restrict w, const uint16_t *restrict wd, const uint16_t *restrict wm,
                       int64_t nb, uint8_t *restrict u, int8_t *restrict sign, float *restrict d, float *restrict m) {
    for (int64_t b = 0; b < nb; b++) {
        d[b] = half_to_float(wd[b]);
        m[b] = kind == 4 ? half_to_float(wm[b]) : 0.f;
    }
    if (kind == 4) {
        for (int64_t b = 0; b < nb; b++) {
#if defined(__AVX2__)
            const __m128i v = _mm_loadu_si128((const __m128i *)(w + b * 16)), lowbits = _mm_set1_epi8(0x0f);
            _mm_storeu_si128((__m128i *)(u + b * 32), _mm_and_si128(v, lowbits));
            _mm_storeu_si128((__m128i *)(u + b * 32 + 16), _mm_and_si128(_mm_srli_epi16(v, 4), lowbits));
#else
            for (int j = 0; j < 16; j++) {
                u[b * 32 + j] = w[b * 16 + j] & 0x0f;
                u[b * 32 + 16 + j] = w[b * 16 + j] >> 4;
            }
#endif
        }
    } else {
        const int8_t *q = (const int8_t *)w;
        memcpy(sign, q, (size_t)nb * 32);
#pragma omp simd
        for (int64_t i = 0; i < nb * 32; i++) u[i] = (uint8_t)(q[i] < 0 ? -q[i] : q[i]);
    }
}

INLINE float dot_floats(const float *restrict a, const float *restrict b, int64_t n) {
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

#if QUANT_ISA > 0
INLINE float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}
#endif

/* out[r][c] (+)= sum over blocks b of d[c][b] * xd[r][b] * (q[c][b] . xq[r][b]) + m[c][b] * xs[r][b]
 * (+ bias[c]), for channels c in [c0, c1): the 4-bit offsets m multiply the activations' scaled
 * block sums. xq, xd, xs come from quantize_blocks. */
static void linear_range(int kind, const int8_t *restrict xq, const float *restrict xd, const float *restrict xs,
                         int64_t rows, int64_t k, const uint8_t *restrict w, const uint16_t *restrict wd,
                         const uint16_t *restrict wm, int64_t c0, int64_t c1, const float *restrict bias,
                         float *restrict out, int64_t out_stride, int accumulate, uint8_t *restrict work) {
    const int64_t nb = k / 32, row_bytes = kind == 4 ? k / 2 : k;
    uint8_t *u = work;                                  /* [TILE][k] */
    int8_t *sign = (int8_t *)(work + TILE * k);         /* [TILE][k], kind 8 */
    float *d = (float *)(work + 2 * TILE * k);          /* [TILE][nb] */
    float *m = d + TILE * nb;                           /* [TILE][nb] */
    float *scales = m + TILE * nb;                      /* [nb] */
    for (int64_t c = c0; c < c1; c += TILE) {
        const int width = c1 - c >= TILE ? TILE : (int)(c1 - c);
        for (int j = 0; j < TILE; j++) {
            const int64_t ch = c + (j < width ? j : 0); /* a partial tile repeats its first channel */
            unpack_row(kind, w + ch * row_bytes, wd + ch * nb, kind == 4 ? wm + ch * nb : NULL, nb, u + j * k,
                       sign + j * k, d + j * nb, m + j * nb);
        }
        for (int64_t r = 0; r < rows; r++) {
            const int8_t *x = xq + r * k;
            const float *xdr = xd + r * nb;
            float result[TILE];
#if QUANT_ISA > 0
            __m256 acc[TILE];
            for (int j = 0; j < TILE; j++) acc[j] = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + b * 32));
                for (int j = 0; j < TILE; j++) {
                    const __m256i uv = _mm256_loadu_si256((const __m256i *)(u + j * k + b * 32));
                    /* kind 8: |q| . (x with q's sign) = q . x, with an unsigned left operand */
                    const __m256i sv = kind == 4 ? xv
                        : _mm256_sign_epi8(xv, _mm256_loadu_si256((const __m256i *)(sign + j * k + b * 32)));
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(uv, sv)), _mm256_set1_ps(d[j * nb + b] * xdr[b]),
                                             acc[j]);
                }
            }
            for (int j = 0; j < TILE; j++) result[j] = hsum(acc[j]);
#else
            for (int j = 0; j < TILE; j++) {
                float total = 0.f;
                for (int64_t b = 0; b < nb; b++) {
                    int32_t isum = 0;
                    for (int i = 0; i < 32; i++) {
                        const int32_t wv = kind == 4 ? u[j * k + b * 32 + i] : sign[j * k + b * 32 + i];
                        isum += wv * x[b * 32 + i];
                    }
                    total += (float)isum * (d[j * nb + b] * xdr[b]);
                }
                result[j] = total;
            }
#endif
            (void)scales;
            float *o = out + r * out_stride + c;
            for (int j = 0; j < width; j++) {
                float v = result[j];
                if (kind == 4) v += dot_floats(m + j * nb, xs + r * nb, nb);
                if (bias) v += bias[c + j];
                o[j] = accumulate ? o[j] + v : v;
            }
        }
    }
}

/* Bytes of work buffer linear_range needs for inputs of width k. */
int64_t quant_work_bytes(int64_t k) { return 2 * TILE * k + (2 * TILE + 1) * (k / 32) * 4 + 64; }

/* out [rows, n] (rows out_stride apart) (+)= x . W^T (+ bias), W [n, k] of `kind` (see the top).
 * `work` holds quant_work_bytes(k) bytes. Returns 0, or -1 for a bad kind or k. */
int quant_linear(int kind, const int8_t *restrict xq, const float *restrict xd, const float *restrict xs,
                 int64_t rows, int64_t k, const uint8_t *restrict w, const uint16_t *restrict wd,
                 const uint16_t *restrict wm, int64_t n, const float *restrict bias, float *restrict out,
                 int64_t out_stride, int accumulate, uint8_t *restrict work) {
    if ((kind != 4 && kind != 8) || k % 32 != 0) return -1;
    linear_range(kind, xq, xd, xs, rows, k, w, wd, wm, 0, n, bias, out, out_stride, accumulate, work);
    return 0;
}
