/* sw_elem.h - typed element access for buffers whose dtype is known only at run time.
 *
 * Kernels keep float32 (or float64) arithmetic and read / write float32,
 * float16 and bfloat16 storage through these helpers (C and CUDA).
 */
#ifndef SEQWRAP_ELEM_H
#define SEQWRAP_ELEM_H

#include <stdint.h>

#include "sw_half.h"
#include "sw_portable.h"
#include "sw_tensor.h"

/* Reads element i of a float32 / float16 / bfloat16 buffer as float32. */
SW_HOSTDEV float sw_load_as_float(const void *p, sw_dtype dtype, int64_t i) {
    if (dtype == SW_BFLOAT16) return sw_bf16_to_float(((const uint16_t *)p)[i]);
    if (dtype == SW_FLOAT16) return sw_fp16_to_float(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

/* Writes v into element i of a float32 / float16 / bfloat16 buffer (round to nearest even). */
SW_HOSTDEV void sw_store_from_float(void *p, sw_dtype dtype, int64_t i, float v) {
    if (dtype == SW_BFLOAT16) ((uint16_t *)p)[i] = sw_float_to_bf16(v);
    else if (dtype == SW_FLOAT16) ((uint16_t *)p)[i] = sw_float_to_fp16(v);
    else ((float *)p)[i] = v;
}

/* Reads element i of a float32 / float16 / bfloat16 / float64 buffer as double. */
SW_HOSTDEV double sw_load_as_double(const void *p, sw_dtype dtype, int64_t i) {
    if (dtype == SW_FLOAT64) return ((const double *)p)[i];
    return (double)sw_load_as_float(p, dtype, i);
}

/* Writes v into element i of a float32 / float16 / bfloat16 / float64 buffer (round to nearest even). */
SW_HOSTDEV void sw_store_from_double(void *p, sw_dtype dtype, int64_t i, double v) {
    if (dtype == SW_FLOAT64) ((double *)p)[i] = v;
    else sw_store_from_float(p, dtype, i, (float)v);
}

/* The one dtype-dispatch idiom of the kernels (C and CUDA): SW_DISPATCH_REAL(dtype, F) expands the
 * caller's macro F(R, SUF) once for the compute type of storage dtype `dtype`: F(double, d) for
 * float64, F(float, f) for float32 / float16 / bfloat16 (half storage is read and written through
 * sw_load_as_float / sw_store_from_float). F names a template instance in CUDA and a suffixed
 * routine in C, e.g.
 *     #define LAUNCH(R, SUF) SW_LAUNCH(kernel<R>, grid, threads, 0, s, *p)
 *     #define ROWS(R, SUF) merge_rows_##SUF(p)
 *     SW_DISPATCH_REAL(p->dtype, LAUNCH);                                                       */
#define SW_DISPATCH_REAL(dtype, F)       \
    do {                                 \
        if ((dtype) == SW_FLOAT64) {     \
            F(double, d);                \
        } else {                         \
            F(float, f);                 \
        }                                \
    } while (0)

#endif /* SEQWRAP_ELEM_H */
