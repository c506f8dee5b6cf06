/* sw_fastexp.h - a branch-free float32 exp that compilers can vectorize (CPU kernels).
 *
 * exp(x) = 2^n * e^f with n = round(x / ln 2) and |f| <= ln(2) / 2; e^f from a
 * degree-7 polynomial (Cephes' expf coefficients), 2^n built from its bits.
 * Relative error below 2 float32 ulps over the clamped range [-87.3, 88.37];
 * inputs below -87.3 give exp(-87.3) ~ 1.2e-38 instead of a subnormal or 0.
 * libm's expf is not vectorized without -ffast-math, which would also break
 * the Kahan summation elsewhere; this keeps IEEE semantics for everything else.
 */
#ifndef SEQWRAP_FASTEXP_H
#define SEQWRAP_FASTEXP_H

#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#pragma omp declare simd notinbranch
#endif
static inline float sw_fast_expf(float x) {
    const float hi = 88.3762626647949f, lo = -87.3f;  /* keeps 2^n a normal float */
    x = x > hi ? hi : (x < lo ? lo : x);
    /* round to nearest by the 1.5 * 2^23 trick: no rounding instruction needed */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float f = (x - n * 0.693359375f) + n * 2.12194440e-4f;  /* x - n ln2, ln2 split in two */
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#endif /* SEQWRAP_FASTEXP_H */
