/* lse_merge_glue.c - seqwrap._C.lse_merge on the call path (call.h).
 *
 * lse_merge(acc_out, acc_lse, blk_out, blk_lse, stream)
 *   acc_out: (..., D) float32 (float64 for float64 attention), updated in place
 *   acc_lse: (...) same dtype, updated in place
 *   blk_out: (..., D) float32 / bfloat16 / float16 with a float32 accumulator, float64 with float64
 *   blk_lse: (...) dtype of acc_lse
 */
#include "call.h"

#include "sw_lse_merge.h"

enum { ACC_OUT, ACC_LSE, BLK_OUT, BLK_LSE, STREAM };

#define LIKE_ACC .dtype_rule = SW_DTYPE_SAME_AS, .dtype_ref = "acc_out"

static const sw_arg_spec args[] = {
    SW_OUT("acc_out", .dtypes = SW_DT(SW_FLOAT32) | SW_DT(SW_FLOAT64), .shape = "...,D", .nonempty = 1),
    SW_OUT("acc_lse", LIKE_ACC, .shape = "..."),
    SW_IN("blk_out", .dtypes = SW_DT_FLOATS16_32 | SW_DT(SW_FLOAT64), .dtype_rule = SW_DTYPE_REAL_IS,
          .dtype_ref = "acc_out", .shape = "...,D"),
    SW_IN("blk_lse", LIKE_ACC, .shape = "..."),
    SW_STREAM("stream"),
};

/* Rows: the leading dims of (..., D) flattened; lse vectors: all their dims flattened. */
static int64_t row_stride(const sw_tensor *t) { return sw_flat_stride(t, t->ndim - 1); }
static int64_t vec_stride(const sw_tensor *t) { return sw_flat_stride(t, t->ndim); }

static sw_code run(const sw_call *c, sw_error *err) {
    const sw_tensor *ao = &c->args[ACC_OUT].t, *al = &c->args[ACC_LSE].t, *bo = &c->args[BLK_OUT].t,
                    *bl = &c->args[BLK_LSE].t;
    const int64_t dim = ao->shape[ao->ndim - 1];
    const sw_lse_merge_params p = {ao->data, row_stride(ao), al->data, vec_stride(al), bo->data, row_stride(bo),
                                   bl->data, vec_stride(bl), ao->dtype, bo->dtype, ao->numel / dim, dim};
    return c->device == SW_CUDA ? sw_lse_merge_cuda(&p, &c->launch, err) : sw_lse_merge_cpu(&p, err);
}

const sw_op sw_lse_merge_op = {"lse_merge", "seqwrap.lse_merge", args, SW_NARGS(args), 1, NULL, run};
