// lse_merge.cu - CUDA kernel of the LSE merge (math in sw_lse_merge.h).
// One thread per output element; each recomputes its row's two weights (cheap,
// and no cross-thread dependency), the row's first thread writes the new lse.
#include "../sw_cuda.h"
#include "../sw_lse_merge.h"
#include "cuda_common.cuh"

#define SW_MERGE_THREADS 256

template <typename R> struct MergeMath;
template <> struct MergeMath<float> {
    static __device__ int weights(float a, float b, float *wa, float *wb, float *l) { return sw_lse_merge_weights_f(a, b, wa, wb, l); }
    static __device__ float load(const void *p, sw_dtype dt, long long i) { return sw_load_as_float(p, dt, i); }
};
template <> struct MergeMath<double> {
    static __device__ int weights(double a, double b, double *wa, double *wb, double *l) { return sw_lse_merge_weights_d(a, b, wa, wb, l); }
    static __device__ double load(const void *p, sw_dtype, long long i) { return ((const double *)p)[i]; }
};

template <typename R>
__global__ void sw_lse_merge_kernel(R *acc_out, R *acc_lse, const void *blk_out, const R *blk_lse, sw_dtype dt,
                                    long long rows, long long dim) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * dim) return;
    const long long r = i / dim;
    // Every thread of row r reads acc_lse[r]; it is only updated by the second kernel, launched
    // after this one on the same stream, so no thread can see a half-updated row.
    R wa, wb, l;
    if (!MergeMath<R>::weights(acc_lse[r], blk_lse[r], &wa, &wb, &l)) return;
    acc_out[i] = (wa == 0 ? (R)0 : wa * acc_out[i]) + wb * MergeMath<R>::load(blk_out, dt, i);
}

template <typename R>
__global__ void sw_lse_update_kernel(R *acc_lse, const R *blk_lse, long long rows) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    R wa, wb, l;
    if (MergeMath<R>::weights(acc_lse[r], blk_lse[r], &wa, &wb, &l)) acc_lse[r] = l;
}

extern "C" sw_code sw_lse_merge_cuda(const sw_lse_merge_job *job, int device, void *stream, sw_error *err) {
    SwDeviceGuard guard(device);
    if (guard.status != cudaSuccess) return sw_cuda_fail(guard.status, "selecting the device", err);
    cudaStream_t s = (cudaStream_t)stream;
    const long long n = job->rows * job->dim;
    const unsigned grid = (unsigned)((n + SW_MERGE_THREADS - 1) / SW_MERGE_THREADS);
    const unsigned grid_rows = (unsigned)((job->rows + SW_MERGE_THREADS - 1) / SW_MERGE_THREADS);
    if (job->is_double) {
        sw_lse_merge_kernel<double><<<grid, SW_MERGE_THREADS, 0, s>>>((double *)job->acc_out, (double *)job->acc_lse,
                                                                     job->blk_out, (const double *)job->blk_lse,
                                                                     job->blk_dtype, job->rows, job->dim);
        sw_lse_update_kernel<double><<<grid_rows, SW_MERGE_THREADS, 0, s>>>((double *)job->acc_lse,
                                                                           (const double *)job->blk_lse, job->rows);
    } else {
        sw_lse_merge_kernel<float><<<grid, SW_MERGE_THREADS, 0, s>>>((float *)job->acc_out, (float *)job->acc_lse,
                                                                    job->blk_out, (const float *)job->blk_lse,
                                                                    job->blk_dtype, job->rows, job->dim);
        sw_lse_update_kernel<float><<<grid_rows, SW_MERGE_THREADS, 0, s>>>((float *)job->acc_lse,
                                                                          (const float *)job->blk_lse, job->rows);
    }
    return sw_cuda_fail(cudaGetLastError(), "launching the LSE merge kernels", err);
}
