// sampler.cu - CUDA kernel of SpaCO's chunk sampler (see sw_sampler.h).
//
// One thread per chunk. Bernoulli: the thread compares its uniform with q_i.
// Fixed: the thread counts the chunks whose (key, index) comes before its own
// (its rank, O(k)); rank < t keeps it. Same keys and order as the CPU's sort.
// An invalid probability gives a NaN weight (the Python wrapper checks first).
#include "cuda_common.cuh"
#include "sw_sampler.h"

#define SW_SAMPLER_THREADS 128

__global__ void sw_sampler_kernel(const sw_sampler_params p) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.k) return;
    if (p.mode == SW_SAMPLE_BERNOULLI) {
        p.weights[i * p.weights_stride] = sw_bernoulli_weight(p.seed, p.step, i, p.probs[i * p.probs_stride]);
        return;
    }
    const uint64_t mine = sw_chunk_key(p.seed, p.step, (uint64_t)i);
    long long rank = 0;
    for (long long j = 0; j < p.k; ++j) {
        rank += sw_key_before(sw_chunk_key(p.seed, p.step, (uint64_t)j), j, mine, i);
    }
    p.weights[i * p.weights_stride] = rank < p.t ? sw_fixed_factor(p.k, p.t, p.cap) : 0.0;
}

extern "C" sw_code sw_sampler_cuda(const sw_sampler_params *params, const sw_launch *l, sw_error *err) {
    sw_code rc = sw_sampler_check(params, err);
    if (rc != SW_OK) return rc;
    SwDeviceGuard guard(l->device);
    if (guard.status != cudaSuccess) return sw_cuda_fail(guard.status, "selecting the device", err);
    const long long blocks = (params->k + SW_SAMPLER_THREADS - 1) / SW_SAMPLER_THREADS;
    if (blocks > 2147483647LL) {
        err->code = SW_ERR_VALUE;
        snprintf(err->message, sizeof err->message, "too many chunks (%lld) for one launch", (long long)params->k);
        return SW_ERR_VALUE;
    }
    SW_LAUNCH(sw_sampler_kernel, (unsigned)blocks, SW_SAMPLER_THREADS, 0, (cudaStream_t)l->stream, *params);
    return sw_cuda_fail(cudaGetLastError(), "launching the chunk sampler kernel", err);
}
