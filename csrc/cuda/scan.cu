// scan.cu - CUDA driver of the selective scan (see sw_scan.h).
//
// One thread per (b, d) row runs exactly the per-row loops the CPU runs
// (sw_scan_impl.h), document resets included (p->reset, a device pointer to the
// (batch, len) int32 starts, read by sw_scan_resets). Its scratch (state / adjoint: dstate values, block states:
// (block+1)*dstate values) lives in p->work, allocated by the caller as
// (batch*dim) * (block+2) * dstate values of the compute type. dB and dC are
// summed over channels with atomicAdd into the caller-zeroed outputs.
#include "../sw_cuda.h"
#include "../sw_scan.h"
#include "cuda_common.cuh"

#define SW_SCAN_THREADS 128

template <typename T>
__global__ void sw_scan_fwd_kernel(const sw_scan_params p) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.batch * p.dim) return;
    T *h = (T *)p.work + r * (p.block + 2) * p.dstate;
    if (sizeof(T) == sizeof(double)) sw_scan_fwd_row_f64(&p, r / p.dim, r % p.dim, (double *)h);
    else sw_scan_fwd_row_f32(&p, r / p.dim, r % p.dim, (float *)h);
}

template <typename T>
__global__ void sw_scan_bwd_kernel(const sw_scan_params p) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.batch * p.dim) return;
    const long long b = r / p.dim, d = r % p.dim;
    T *mu = (T *)p.work + r * (p.block + 2) * p.dstate;
    T *hs = mu + p.dstate;
    T *dB = (T *)p.dB + b * p.dstate * p.len;
    T *dC = (T *)p.dC + b * p.dstate * p.len;
    if (sizeof(T) == sizeof(double))
        sw_scan_bwd_row_f64(&p, b, d, (double *)mu, (double *)hs, (double *)dB, (double *)dC);
    else
        sw_scan_bwd_row_f32(&p, b, d, (float *)mu, (float *)hs, (float *)dB, (float *)dC);
}

static sw_code launch(const sw_scan_params *p, int backward, int device, void *stream, sw_error *err) {
    SwDeviceGuard guard(device);
    if (guard.status != cudaSuccess) return sw_cuda_fail(guard.status, "selecting the device", err);
    const long long rows = p->batch * p->dim;
    const unsigned blocks = (unsigned)((rows + SW_SCAN_THREADS - 1) / SW_SCAN_THREADS);
    cudaStream_t s = (cudaStream_t)stream;
    if (backward) {
        if (p->f64) sw_scan_bwd_kernel<double><<<blocks, SW_SCAN_THREADS, 0, s>>>(*p);
        else sw_scan_bwd_kernel<float><<<blocks, SW_SCAN_THREADS, 0, s>>>(*p);
    } else {
        if (p->f64) sw_scan_fwd_kernel<double><<<blocks, SW_SCAN_THREADS, 0, s>>>(*p);
        else sw_scan_fwd_kernel<float><<<blocks, SW_SCAN_THREADS, 0, s>>>(*p);
    }
    return sw_cuda_fail(cudaGetLastError(), backward ? "launching the scan backward kernel"
                                                     : "launching the scan forward kernel", err);
}

extern "C" sw_code sw_scan_fwd_cuda(const sw_scan_params *p, int device, void *stream, sw_error *err) {
    return launch(p, 0, device, stream, err);
}

extern "C" sw_code sw_scan_bwd_cuda(const sw_scan_params *p, int device, void *stream, sw_error *err) {
    return launch(p, 1, device, stream, err);
}
