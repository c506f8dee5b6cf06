/* sw_half.h - bfloat16 / float16 <-> float32 conversions, usable from C and CUDA.
 *
 * Half-precision values travel as raw uint16_t bit patterns so that the same
 * code compiles with gcc (no _Float16 needed) and nvcc. Exact conversions:
 * every bf16/fp16 value is representable in float32.
 */
#ifndef SEQWRAP_HALF_H
#define SEQWRAP_HALF_H

#include <stdint.h>
#include <string.h>

#include "sw_portable.h"

SW_HOSTDEV float sw_bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(bits);
#else
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

SW_HOSTDEV uint32_t sw_float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
#endif
}

/* bfloat16 is the upper half of a float32. */
SW_HOSTDEV float sw_bf16_to_float(uint16_t h) {
    return sw_bits_to_float((uint32_t)h << 16);
}

/* IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. */
SW_HOSTDEV float sw_fp16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {                 /* inf or nan */
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {              /* normal: rebias 15 -> 127 */
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {              /* signed zero */
        bits = sign;
    } else {                            /* subnormal: man * 2^-24, exact in float32 */
        float mag = (float)man * 5.9604644775390625e-08f;
        bits = sign | sw_float_to_bits(mag);
    }
    return sw_bits_to_float(bits);
}

/* float32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN. */
SW_HOSTDEV uint16_t sw_float_to_bf16(float f) {
    uint32_t u = sw_float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* float32 -> IEEE binary16, round to nearest even, overflow to inf, subnormals kept. */
SW_HOSTDEV uint16_t sw_float_to_fp16(float f) {
    uint32_t x = sw_float_to_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u));
    if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);      /* >= 65520 rounds to inf */
    if (x < 0x38800000u) {                                         /* below 2^-14: subnormal or 0 */
        uint32_t e = x >> 23;
        uint32_t shift = 126u - e;                                 /* value = m * 2^(e-150); k = m >> shift */
        if (shift > 24u) return (uint16_t)sign;
        uint32_t m = (x & 0x7fffffu) | 0x800000u;
        uint32_t k = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (k & 1u))) ++k;
        return (uint16_t)(sign | k);
    }
    x += 0xfffu + ((x >> 13) & 1u);                                /* round at bit 13 */
    x -= 112u << 23;                                               /* rebias 127 -> 15 */
    return (uint16_t)(sign | (x >> 13));
}

#endif /* SEQWRAP_HALF_H */
