/* xent_cpu.c - CPU kernel of the chunked softmax cross-entropy (see sw_xent.h).
 * The row routine lives in xent_row.inc, instantiated once per real type. */
#include "sw_xent.h"

#define SW_CAT_(a, b) a##b
#define SW_CAT(a, b) SW_CAT_(a, b)

/* float arithmetic for float32 / bfloat16 / float16 logits */
#define SUF f
#define REAL float
#define EXP expf
#define LOG logf
#define LOAD(p, i) sw_load_as_float((p), dtype, (i))
#define STORE(p, i, v) sw_store_from_float((p), dtype, (i), (v))
#define SPILL (dtype == SW_FLOAT32)
#include "xent_row.inc"
#undef SUF
#undef REAL
#undef EXP
#undef LOG
#undef LOAD
#undef STORE
#undef SPILL

/* double arithmetic for float64 logits */
#define SUF d
#define REAL double
#define EXP exp
#define LOG log
#define LOAD(p, i) (((const double *)(p))[i])
#define STORE(p, i, v) (((double *)(p))[i] = (v))
#define SPILL 1
#include "xent_row.inc"

static size_t elem_size(sw_dtype d) {
    return d == SW_FLOAT64 ? 8 : d == SW_FLOAT32 ? 4 : 2;
}

sw_code sw_xent_cpu(const sw_xent_job *job, sw_error *err) {
    (void)err;
    const int64_t rows = job->rows, V = job->vocab;
    const size_t row_bytes = (size_t)V * elem_size(job->dtype);
    const int is_double = job->dtype == SW_FLOAT64;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (rows * V >= 65536)
#endif
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t label = job->labels[r];
        const int ignored = label == job->params.ignore_index;
        void *row = (char *)job->logits + (size_t)r * row_bytes;
        if (is_double) {
            double scale = job->grad_scale ? ((const double *)job->grad_scale)[r] : 1.0;
            xent_row_d(row, job->dtype, V, label, ignored, scale, &job->params, job->compute_grad,
                       &((double *)job->loss)[r], &((double *)job->lse)[r]);
        } else {
            float scale = job->grad_scale ? ((const float *)job->grad_scale)[r] : 1.0f;
            xent_row_f(row, job->dtype, V, label, ignored, scale, &job->params, job->compute_grad,
                       &((float *)job->loss)[r], &((float *)job->lse)[r]);
        }
    }
    return SW_OK;
}
