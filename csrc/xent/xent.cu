// xent.cu - CUDA kernel of the chunked softmax cross-entropy (math in sw_xent.h).
//
// One block per logits row: pass 1 max and sum of the capped logits, pass 2 the
// sum of exp(s - max), then the row's lse and loss, and pass 3 the gradient
// written in place. float arithmetic for fp32/bf16/fp16 logits, double for fp64.
// A label outside [0, V) sets *error_flag and the row is treated as ignored.
#include <math.h>

#include "block_reduce.cuh"
#include "cuda_common.cuh"
#include "sw_xent.h"

#define SW_XENT_THREADS 512

// The per-element math of sw_xent.h for compute type R (suffix SUF), and element access of the
// logits through double (exact for every storage dtype and for both compute types).
template <typename R> struct XentMath;
#define SW_XENT_MATH(R, SUF, EXP, LOG)                                                                              \
    template <> struct XentMath<R> {                                                                                \
        static __device__ R load(const void *p, sw_dtype dt, long long i) { return (R)sw_load_as_double(p, dt, i); } \
        static __device__ void store(void *p, sw_dtype dt, long long i, R v) { sw_store_from_double(p, dt, i, v); } \
        static __device__ R cap(R x, R c) { return sw_xent_cap_##SUF(x, c); }                                      \
        static __device__ R cap_grad(R s, R c) { return sw_xent_cap_grad_##SUF(s, c); }                            \
        static __device__ R loss(R ls, R dy, R sd, R l, R e, R z, long long v) {                                    \
            return sw_xent_loss_##SUF(ls, dy, sd, l, e, z, v);                                                      \
        }                                                                                                           \
        static __device__ R dlogit(R p, int y, R f, R e, long long v) { return sw_xent_dlogit_##SUF(p, y, f, e, v); } \
        static __device__ R exp_(R x) { return EXP(x); }                                                            \
        static __device__ R log_(R x) { return LOG(x); }                                                            \
    };
SW_XENT_MATH(float, f, expf, logf)
SW_XENT_MATH(double, d, exp, log)

// One block per row; the job travels by value (its pointers are device pointers).
template <typename R>
__global__ void __launch_bounds__(SW_XENT_THREADS) sw_xent_kernel(const sw_xent_params job) {
    using M = XentMath<R>;
    __shared__ R scratch[32];
    __shared__ long long label_once;
    const long long r = blockIdx.x;
    const sw_dtype dt = job.dtype;
    const long long V = job.vocab;
    const long long elem_bytes = dt == SW_FLOAT64 ? 8 : dt == SW_FLOAT32 ? 4 : 2;
    void *row = (char *)job.logits + r * job.logits_row_stride * elem_bytes;
    const sw_xent_options prm = job.opt;
    const R cap = (R)prm.softcap, eps = (R)prm.label_smoothing, z = (R)prm.z_loss;
    // The label is read once, by one thread, and shared: the host may be writing the labels.
    if (threadIdx.x == 0) label_once = *(const volatile int64_t *)&job.labels[r * job.labels_stride];
    __syncthreads();
    const int64_t y = label_once;
    bool ignored = y == prm.ignore_index;
    if (!ignored && (y < 0 || y >= V)) {
        if (threadIdx.x == 0) atomicExch(job.error_flag, 1);
        ignored = true;
    }

    R m = -INFINITY;
    for (long long j = threadIdx.x; j < V; j += blockDim.x) {
        const R s = M::cap(M::load(row, dt, j), cap);
        m = s > m ? s : m;
    }
    m = sw_block_reduce(m, scratch, SwMaxOp<R>(), (R)-INFINITY);
    const R d_label = ignored ? (R)0 : M::cap(M::load(row, dt, y), cap) - m;  // read before pass 3 writes

    R sum_e = 0, sum_d = 0;
    for (long long j = threadIdx.x; j < V; j += blockDim.x) {
        const R d = M::cap(M::load(row, dt, j), cap) - m;
        sum_e += M::exp_(d);
        sum_d += d;
    }
    sum_e = sw_block_reduce(sum_e, scratch, SwSumOp<R>(), (R)0);
    sum_d = sw_block_reduce(sum_d, scratch, SwSumOp<R>(), (R)0);
    const R log_sum_e = M::log_(sum_e);
    const R l = m + log_sum_e;
    if (threadIdx.x == 0) {
        ((R *)job.lse)[r * job.lse_stride] = l;
        ((R *)job.loss)[r * job.loss_stride] = ignored ? (R)0 : M::loss(log_sum_e, d_label, sum_d, l, eps, z, V);
    }
    if (!job.compute_grad) return;
    const R scale = job.grad_scale ? ((const R *)job.grad_scale)[r * job.grad_scale_stride] : (R)1;
    const R p_factor = (R)1 + (R)2 * z * l;
    const R inv_sum = (R)1 / sum_e;
    __syncthreads();  // every thread has read its d_label before any row element is overwritten
    for (long long j = threadIdx.x; j < V; j += blockDim.x) {
        R g = 0;
        if (!ignored) {
            // exp(s - m) / sum_e, not exp(s - lse): lse rounds to m when m is near the largest float
            R s = M::cap(M::load(row, dt, j), cap);
            g = M::dlogit(M::exp_(s - m) * inv_sum, j == y, p_factor, eps, V) * M::cap_grad(s, cap) * scale;
        }
        M::store(row, dt, j, g);
    }
}

extern "C" sw_code sw_xent_cuda(const sw_xent_params *p, const sw_launch *l, sw_error *err) {
    SwDeviceGuard guard(l->device);
    if (guard.status != cudaSuccess) return sw_cuda_fail(guard.status, "selecting the device", err);
    if (p->rows > 2147483647LL) {
        err->code = SW_ERR_VALUE;
        snprintf(err->message, sizeof err->message, "too many rows in one chunk (%lld)", (long long)p->rows);
        return SW_ERR_VALUE;
    }
    cudaStream_t s = (cudaStream_t)l->stream;
#define LAUNCH(R, SUF) SW_LAUNCH(sw_xent_kernel<R>, (unsigned)p->rows, SW_XENT_THREADS, 0, s, *p)
    SW_DISPATCH_REAL(p->dtype, LAUNCH);
#undef LAUNCH
    return sw_cuda_fail(cudaGetLastError(), "launching the cross-entropy kernel", err);
}
