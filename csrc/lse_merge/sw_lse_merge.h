/* sw_lse_merge.h - online-softmax (LSE) merge of partial attention results.
 *
 * Attention of a query row over key blocks A and B, computed separately, gives
 * (out_A, lse_A) and (out_B, lse_B) with lse = log sum exp(scores). The result
 * over A u B is
 *     lse = max + log1p(exp(-|lse_A - lse_B|)),   max = max(lse_A, lse_B)
 *     out = exp(lse_A - lse) * out_A + exp(lse_B - lse) * out_B
 * A block with lse = -inf (every key masked) contributes nothing, whatever its
 * output holds (it may be NaN). The accumulator (out, lse) is float32, or
 * float64 for float64 attention; block outputs may be float32/bf16/fp16/fp64.
 */
#ifndef SEQWRAP_LSE_MERGE_H
#define SEQWRAP_LSE_MERGE_H

#include <math.h>
#include <stdint.h>

#include "ops.h"
#include "sw_elem.h"
#include "sw_portable.h"
#include "sw_status.h"
#include "sw_tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Weights of the accumulator (w_acc) and the block (w_blk), and the merged lse.
 * Returns 0 when the block is empty (lse_blk = -inf): the accumulator stays as it is. */
#define SW_LSE_DEFINE_MERGE(SUF, REAL, EXP, LOG1P)                                                     \
    SW_HOSTDEV int sw_lse_merge_weights_##SUF(REAL lse_acc, REAL lse_blk, REAL *w_acc, REAL *w_blk,     \
                                              REAL *lse_new) {                                         \
        if (lse_blk == -(REAL)INFINITY) return 0;                                                      \
        if (lse_acc == -(REAL)INFINITY) {                                                              \
            *w_acc = 0;                                                                                \
            *w_blk = 1;                                                                                \
            *lse_new = lse_blk;                                                                        \
            return 1;                                                                                  \
        }                                                                                              \
        REAL mx = lse_acc > lse_blk ? lse_acc : lse_blk;                                               \
        REAL d = lse_acc > lse_blk ? lse_blk - lse_acc : lse_acc - lse_blk;                            \
        REAL merged = mx + LOG1P(EXP(d));                                                              \
        *w_acc = EXP(lse_acc - merged);                                                                \
        *w_blk = EXP(lse_blk - merged);                                                                \
        *lse_new = merged;                                                                             \
        return 1;                                                                                      \
    }

SW_LSE_DEFINE_MERGE(f, float, expf, log1pf)
SW_LSE_DEFINE_MERGE(d, double, exp, log1p)

/* The merge weights for either compute type, so kernels can be written once over R. */
#ifdef __cplusplus
extern "C++" {
SW_HOSTDEV int sw_lse_merge_weights(float a, float b, float *wa, float *wb, float *l) {
    return sw_lse_merge_weights_f(a, b, wa, wb, l);
}
SW_HOSTDEV int sw_lse_merge_weights(double a, double b, double *wa, double *wb, double *l) {
    return sw_lse_merge_weights_d(a, b, wa, wb, l);
}
}
#else
#define sw_lse_merge_weights(a, b, wa, wb, l) \
    _Generic((a), float: sw_lse_merge_weights_f, double: sw_lse_merge_weights_d)(a, b, wa, wb, l)
#endif

/* rows x dim (the leading dims of the attention output flattened into rows):
 * acc_out (rows, dim) and acc_lse (rows,) real (float32, or float64 when acc_dtype is float64);
 * blk_out (rows, dim) of blk_dtype (real(blk_dtype) == acc_dtype); blk_lse (rows,) real.
 * Row r of acc_out / blk_out starts at r * its row stride, its dim elements at stride 1;
 * element r of the lse vectors sits at r * its stride. */
typedef struct sw_lse_merge_params {
    void *acc_out;
    int64_t acc_out_row_stride;
    void *acc_lse;
    int64_t acc_lse_stride;
    const void *blk_out;
    int64_t blk_out_row_stride;
    const void *blk_lse;
    int64_t blk_lse_stride;
    sw_dtype acc_dtype;
    sw_dtype blk_dtype;
    int64_t rows;
    int64_t dim;
} sw_lse_merge_params;

/* CPU: OpenMP over rows. CUDA: sw_lse_merge_cuda (ops.h). */
sw_code sw_lse_merge_cpu(const sw_lse_merge_params *p, sw_error *err);

#ifdef __cplusplus
}
#endif

#endif /* SEQWRAP_LSE_MERGE_H */
