// lse_merge.cu - CUDA kernel of the LSE merge (math in sw_lse_merge.h).
// One thread per output element; each recomputes its row's two weights (cheap,
// and no cross-thread dependency), the row's first thread writes the new lse.
#include "cuda_common.cuh"
#include "sw_lse_merge.h"

#define SW_MERGE_THREADS 256

// One thread per element of acc_out; element i is (row i / dim, column i % dim).
template <typename R>
__global__ void sw_lse_merge_kernel(const sw_lse_merge_params p) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.rows * p.dim) return;
    const long long r = i / p.dim, k = i % p.dim;
    // Every thread of row r reads acc_lse[r]; it is only updated by the second kernel, launched
    // after this one on the same stream, so no thread can see a half-updated row.
    R wa, wb, l;
    const R acc_lse = ((const R *)p.acc_lse)[r * p.acc_lse_stride];
    if (!sw_lse_merge_weights(acc_lse, ((const R *)p.blk_lse)[r * p.blk_lse_stride], &wa, &wb, &l)) return;
    R *acc = (R *)p.acc_out + r * p.acc_out_row_stride + k;
    const R b = (R)sw_load_as_double(p.blk_out, p.blk_dtype, r * p.blk_out_row_stride + k);
    *acc = (wa == 0 ? (R)0 : wa * *acc) + wb * b;
}

template <typename R>
__global__ void sw_lse_update_kernel(const sw_lse_merge_params p) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.rows) return;
    R wa, wb, l;
    R *acc_lse = (R *)p.acc_lse + r * p.acc_lse_stride;
    if (sw_lse_merge_weights(*acc_lse, ((const R *)p.blk_lse)[r * p.blk_lse_stride], &wa, &wb, &l)) *acc_lse = l;
}

extern "C" sw_code sw_lse_merge_cuda(const sw_lse_merge_params *p, const sw_launch *l, sw_error *err) {
    SwDeviceGuard guard(l->device);
    if (guard.status != cudaSuccess) return sw_cuda_fail(guard.status, "selecting the device", err);
    cudaStream_t s = (cudaStream_t)l->stream;
    const long long n = p->rows * p->dim;
    const unsigned grid = (unsigned)((n + SW_MERGE_THREADS - 1) / SW_MERGE_THREADS);
    const unsigned grid_rows = (unsigned)((p->rows + SW_MERGE_THREADS - 1) / SW_MERGE_THREADS);
#define LAUNCH(R, SUF)                                                     \
    SW_LAUNCH(sw_lse_merge_kernel<R>, grid, SW_MERGE_THREADS, 0, s, *p);      \
    SW_LAUNCH(sw_lse_update_kernel<R>, grid_rows, SW_MERGE_THREADS, 0, s, *p)
    SW_DISPATCH_REAL(p->acc_dtype, LAUNCH);
#undef LAUNCH
    return sw_cuda_fail(cudaGetLastError(), "launching the LSE merge kernels", err);
}
