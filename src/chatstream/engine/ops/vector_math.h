/* Vector-friendly math shared by chatstream's kernels (engine/ops/kernels.c, engine/quant/kernels.c).
 * Included, not compiled alone; chatstream.engine.ops.native keys its build cache on this file too. */
#ifndef CHATSTREAM_VECTOR_MATH_H
#define CHATSTREAM_VECTOR_MATH_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* e^x within ~2 ulp, in operations -fopenmp-simd vectorises (libm's expf is a scalar call without
 * -ffast-math). Inputs are clamped to [-87, 88], where the result is a normal float. */
static inline __attribute__((always_inline)) float exp_approx(float x) {
    x = x < -87.f ? -87.f : x > 88.f ? 88.f : x;
    const float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return y * two_n;
}

/* RMSNorm of one row into `work`: x / sqrt(mean(x^2) + eps) * weight (both kernels' fused
 * norm + quantize start from it, so their rows are normalised alike). */
static inline __attribute__((always_inline)) void rms_norm_row(const float *restrict x, int64_t k,
                                                              const float *restrict weight, float eps,
                                                              float *restrict work) {
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < k; i++) sum += x[i] * x[i];
    const float inv = 1.f / sqrtf(sum / (float)k + eps);
#pragma omp simd
    for (int64_t i = 0; i < k; i++) work[i] = x[i] * inv * weight[i];
}

#endif
