/* lse_merge_cpu.c - CPU kernel of the LSE merge (see sw_lse_merge.h); OpenMP over rows. */
#include "sw_lse_merge.h"

sw_code sw_lse_merge_cpu(const sw_lse_merge_job *job, sw_error *err) {
    (void)err;
    const int64_t rows = job->rows, dim = job->dim;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (rows * dim >= 32768)
#endif
    for (int64_t r = 0; r < rows; ++r) {
        if (job->is_double) {
            double *acc = (double *)job->acc_out + r * dim;
            const double *blk = (const double *)job->blk_out + r * dim;
            double wa, wb, l;
            double *lse = &((double *)job->acc_lse)[r];
            if (!sw_lse_merge_weights_d(*lse, ((const double *)job->blk_lse)[r], &wa, &wb, &l)) continue;
            for (int64_t k = 0; k < dim; ++k) acc[k] = (wa == 0 ? 0 : wa * acc[k]) + wb * blk[k];
            *lse = l;
        } else {
            float *acc = (float *)job->acc_out + r * dim;
            float wa, wb, l;
            float *lse = &((float *)job->acc_lse)[r];
            if (!sw_lse_merge_weights_f(*lse, ((const float *)job->blk_lse)[r], &wa, &wb, &l)) continue;
            for (int64_t k = 0; k < dim; ++k) {
                float b = sw_load_as_float(job->blk_out, job->blk_dtype, r * dim + k);
                acc[k] = (wa == 0 ? 0 : wa * acc[k]) + wb * b;
            }
            *lse = l;
        }
    }
    return SW_OK;
}
