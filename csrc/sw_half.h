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

#endif /* SEQWRAP_HALF_H */
