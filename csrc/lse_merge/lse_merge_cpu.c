/* lse_merge_cpu.c - CPU kernel of the LSE merge (see sw_lse_merge.h); OpenMP over rows. */
#include "sw_lse_merge.h"

/* Every row in compute type R: acc = w_acc * acc + w_blk * blk; lse = the merged lse. */
#define SW_DEFINE_MERGE_ROWS(R, SUF)                                                                \
    static void merge_rows_##SUF(const sw_lse_merge_params *p) {                                   \
        const int64_t rows = p->rows, dim = p->dim;                                                \
        _Pragma("omp parallel for schedule(static) if (rows * dim >= 32768)")                      \
        for (int64_t r = 0; r < rows; ++r) {                                                       \
            R *acc = (R *)p->acc_out + r * p->acc_out_row_stride;                                  \
            R *lse = (R *)p->acc_lse + r * p->acc_lse_stride;                                      \
            const R blk_lse = ((const R *)p->blk_lse)[r * p->blk_lse_stride];                      \
            const int64_t blk0 = r * p->blk_out_row_stride;                                        \
            R wa, wb, l;                                                                           \
            if (!sw_lse_merge_weights(*lse, blk_lse, &wa, &wb, &l)) continue;                      \
            for (int64_t k = 0; k < dim; ++k) {                                                    \
                const R b = (R)sw_load_as_double(p->blk_out, p->blk_dtype, blk0 + k);              \
                acc[k] = (wa == 0 ? (R)0 : wa * acc[k]) + wb * b;                                  \
            }                                                                                      \
            *lse = l;                                                                              \
        }                                                                                          \
    }

SW_DEFINE_MERGE_ROWS(float, f)
SW_DEFINE_MERGE_ROWS(double, d)

sw_code sw_lse_merge_cpu(const sw_lse_merge_params *p, sw_error *err) {
    (void)err;
#define ROWS(R, SUF) merge_rows_##SUF(p)
    SW_DISPATCH_REAL(p->acc_dtype, ROWS);
#undef ROWS
    return SW_OK;
}
