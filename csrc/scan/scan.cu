// scan.cu - CUDA driver of the selective scan (see scan.h), both modes.
//
// One thread per (b, h, p) row runs the per-head loops of scan_impl.h for that single row, the
// code the CPU runs. Its scratch (SW_SCAN_WORK(1, dstate, block) values of the compute type:
// adjoint, block states, step constants) lives in p->work, allocated by the caller for every
// row. ddt (a sum over the head's rows) and dB, dC (sums over the group's rows) are added with
// atomicAdd into the caller-zeroed outputs; dx, dz, dA, dD, dh0 are written per row.
#include "../cuda/cuda_common.cuh"
#include "scan.h"

#define SW_SCAN_THREADS 128

// Row r of the launch: its batch, head and head channel.
struct SwScanRow {
    long long b, h, pi;
    __device__ explicit SwScanRow(const sw_scan_params &p, long long r)
        : b(r / (p.headdim * p.heads)), h((r / p.headdim) % p.heads), pi(r % p.headdim) {}
};

template <typename T>
__global__ void sw_scan_fwd_kernel(const sw_scan_params p) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.batch * p.heads * p.headdim) return;
    const SwScanRow w(p, r);
    T *s = (T *)p.work + r * SW_SCAN_WORK(1, p.dstate, p.block);
    if (sizeof(T) == sizeof(double)) sw_scan_fwd_head_f64(&p, w.b, w.h, w.pi, w.pi + 1, (double *)s, (double *)s + p.dstate);
    else sw_scan_fwd_head_f32(&p, w.b, w.h, w.pi, w.pi + 1, (float *)s, (float *)s + p.dstate);
}

template <typename T>
__global__ void sw_scan_bwd_kernel(const sw_scan_params p) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.batch * p.heads * p.headdim) return;
    const SwScanRow w(p, r);
    const long long g = w.h / (p.heads / p.groups), N = p.dstate;
    T *mu = (T *)p.work + r * SW_SCAN_WORK(1, N, p.block);
    T *hs = mu + N, *tmp = hs + (p.block + 1) * N;
    const long long off = w.b * p.sb[0] + g * p.sb[2];   // dB[b, 0, g, 0]
    T *dB = (T *)p.dB + off, *dC = (T *)p.dC + off;
    if (sizeof(T) == sizeof(double))
        sw_scan_bwd_head_f64(&p, w.b, w.h, w.pi, w.pi + 1, (double *)mu, (double *)hs, (double *)tmp, (double *)dB,
                             (double *)dC, p.sb[1], p.sb[3]);
    else
        sw_scan_bwd_head_f32(&p, w.b, w.h, w.pi, w.pi + 1, (float *)mu, (float *)hs, (float *)tmp, (float *)dB,
                             (float *)dC, p.sb[1], p.sb[3]);
}

static sw_code launch(const sw_scan_params *p, int backward, const sw_launch *l, sw_error *err) {
    SwDeviceGuard guard(l->device);
    if (guard.status != cudaSuccess) return sw_cuda_fail(guard.status, "selecting the device", err);
    const long long rows = p->batch * p->heads * p->headdim;
    const unsigned blocks = (unsigned)((rows + SW_SCAN_THREADS - 1) / SW_SCAN_THREADS);
    cudaStream_t s = (cudaStream_t)l->stream;
    if (backward) {   // ddt, dB, dC are sums: zeroed first
        const size_t ts = p->f64 ? sizeof(double) : sizeof(float);
        const size_t nb = (size_t)(p->batch * p->len * p->groups * p->dstate) * ts;
        cudaError_t e = cudaMemsetAsync(p->ddt, 0, (size_t)(p->batch * p->len * p->heads) * ts, s);
        if (e == cudaSuccess) e = cudaMemsetAsync(p->dB, 0, nb, s);
        if (e == cudaSuccess) e = cudaMemsetAsync(p->dC, 0, nb, s);
        if (e != cudaSuccess) return sw_cuda_fail(e, "zeroing the scan backward sums", err);
        if (p->f64) SW_LAUNCH(sw_scan_bwd_kernel<double>, blocks, SW_SCAN_THREADS, 0, s, *p);
        else SW_LAUNCH(sw_scan_bwd_kernel<float>, blocks, SW_SCAN_THREADS, 0, s, *p);
    } else {
        if (p->f64) SW_LAUNCH(sw_scan_fwd_kernel<double>, blocks, SW_SCAN_THREADS, 0, s, *p);
        else SW_LAUNCH(sw_scan_fwd_kernel<float>, blocks, SW_SCAN_THREADS, 0, s, *p);
    }
    return sw_cuda_fail(cudaGetLastError(), backward ? "launching the scan backward kernel"
                                                     : "launching the scan forward kernel", err);
}

extern "C" sw_code sw_scan_fwd_cuda(const sw_scan_params *p, const sw_launch *l, sw_error *err) {
    return launch(p, 0, l, err);
}

extern "C" sw_code sw_scan_bwd_cuda(const sw_scan_params *p, const sw_launch *l, sw_error *err) {
    return launch(p, 1, l, err);
}
