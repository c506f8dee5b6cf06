// ssd.cu - CUDA driver of the Mamba-2 (SSD) scan (see sw_ssd.h).
//
// One thread per (b, h, p) row runs exactly the per-row loops the CPU runs
// (sw_ssd_impl.h). Its scratch (state / adjoint: dstate values, block states:
// (block+1)*dstate values) lives in p->work, allocated by the caller as
// (batch*heads*headdim) * (block+2) * dstate values of the compute type. ddt (a
// sum over the head's rows) and dB, dC (sums over the group's rows) are added with
// atomicAdd into the caller-zeroed outputs; dA and dD are written per row.
#include "../sw_ssd.h"
#include "cuda_common.cuh"

#define SW_SSD_THREADS 128

template <typename T>
__global__ void sw_ssd_fwd_kernel(const sw_ssd_params p) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.batch * p.heads * p.headdim) return;
    const long long pi = r % p.headdim, h = (r / p.headdim) % p.heads, b = r / (p.headdim * p.heads);
    T *s = (T *)p.work + r * (p.block + 2) * p.dstate;
    if (sizeof(T) == sizeof(double)) sw_ssd_fwd_row_f64(&p, b, h, pi, (double *)s);
    else sw_ssd_fwd_row_f32(&p, b, h, pi, (float *)s);
}

template <typename T>
__global__ void sw_ssd_bwd_kernel(const sw_ssd_params p) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.batch * p.heads * p.headdim) return;
    const long long pi = r % p.headdim, h = (r / p.headdim) % p.heads, b = r / (p.headdim * p.heads);
    const long long g = h / (p.heads / p.groups);
    T *mu = (T *)p.work + r * (p.block + 2) * p.dstate;
    T *hs = mu + p.dstate;
    const long long off = (b * p.len * p.groups + g) * p.dstate;   // dB[b, 0, g, 0]
    T *dB = (T *)p.dB + off;
    T *dC = (T *)p.dC + off;
    const long long tstride = p.groups * p.dstate;
    if (sizeof(T) == sizeof(double))
        sw_ssd_bwd_row_f64(&p, b, h, pi, (double *)mu, (double *)hs, (double *)dB, (double *)dC, tstride);
    else
        sw_ssd_bwd_row_f32(&p, b, h, pi, (float *)mu, (float *)hs, (float *)dB, (float *)dC, tstride);
}

static sw_code launch(const sw_ssd_params *p, int backward, int device, void *stream, sw_error *err) {
    SwDeviceGuard guard(device);
    if (guard.status != cudaSuccess) return sw_cuda_fail(guard.status, "selecting the device", err);
    const long long rows = p->batch * p->heads * p->headdim;
    const unsigned blocks = (unsigned)((rows + SW_SSD_THREADS - 1) / SW_SSD_THREADS);
    cudaStream_t s = (cudaStream_t)stream;
    if (backward) {
        if (p->f64) sw_ssd_bwd_kernel<double><<<blocks, SW_SSD_THREADS, 0, s>>>(*p);
        else sw_ssd_bwd_kernel<float><<<blocks, SW_SSD_THREADS, 0, s>>>(*p);
    } else {
        if (p->f64) sw_ssd_fwd_kernel<double><<<blocks, SW_SSD_THREADS, 0, s>>>(*p);
        else sw_ssd_fwd_kernel<float><<<blocks, SW_SSD_THREADS, 0, s>>>(*p);
    }
    return sw_cuda_fail(cudaGetLastError(), backward ? "launching the SSD scan backward kernel"
                                                     : "launching the SSD scan forward kernel", err);
}

extern "C" sw_code sw_ssd_fwd_cuda(const sw_ssd_params *p, int device, void *stream, sw_error *err) {
    return launch(p, 0, device, stream, err);
}

extern "C" sw_code sw_ssd_bwd_cuda(const sw_ssd_params *p, int device, void *stream, sw_error *err) {
    return launch(p, 1, device, stream, err);
}
