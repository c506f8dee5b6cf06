// kahan.cu - CUDA kernel of compensated scaled accumulation (see sw_kahan.h).
//
// Multi-tensor launch: up to SW_MT_MAX jobs travel by value in the kernel
// parameters; job j owns blocks [block_start[j], block_start[j+1]) and walks
// its n elements with a block-stride loop. One launch per group of jobs.
#include "cuda_common.cuh"
#include "sw_kahan.h"

#define SW_MT_MAX 32
#define SW_KAHAN_THREADS 256
#define SW_KAHAN_MAX_BLOCKS_PER_JOB 1024

struct SwKahanBatch {
    float *acc[SW_MT_MAX];
    float *comp[SW_MT_MAX];
    const void *g[SW_MT_MAX];
    long long n[SW_MT_MAX];
    long long stride[SW_MT_MAX][3];  // acc, comp, g: element strides
    int dtype[SW_MT_MAX];
    int block_start[SW_MT_MAX + 1];
    int njobs;
};

__global__ void sw_kahan_kernel(const SwKahanBatch batch, float scale) {
    const int b = (int)blockIdx.x;
    int j = 0;
    while (j + 1 < batch.njobs && b >= batch.block_start[j + 1]) ++j;
    const int first = batch.block_start[j];
    const int nblocks = batch.block_start[j + 1] - first;
    const long long n = batch.n[j];
    float *acc = batch.acc[j];
    float *comp = batch.comp[j];
    const void *g = batch.g[j];
    const sw_dtype dt = (sw_dtype)batch.dtype[j];
    const long long sa = batch.stride[j][0], sc = batch.stride[j][1], sg = batch.stride[j][2];
    const long long step = (long long)nblocks * blockDim.x;
    for (long long i = (long long)(b - first) * blockDim.x + threadIdx.x; i < n; i += step) {
        float a = acc[i * sa], c = comp[i * sc];
        sw_kahan_step(&a, &c, sw_load_as_float(g, dt, i * sg), scale);
        acc[i * sa] = a;
        comp[i * sc] = c;
    }
}

extern "C" sw_code sw_kahan_cuda(const sw_kahan_params *p, const sw_launch *l, sw_error *err) {
    SwDeviceGuard guard(l->device);
    if (guard.status != cudaSuccess) return sw_cuda_fail(guard.status, "selecting the device", err);
    cudaStream_t s = (cudaStream_t)l->stream;
    const sw_kahan_job *jobs = p->jobs;
    const int njobs = p->njobs;
    const float scale = p->scale;
    for (int start = 0; start < njobs; start += SW_MT_MAX) {
        SwKahanBatch batch;
        batch.njobs = njobs - start < SW_MT_MAX ? njobs - start : SW_MT_MAX;
        int blocks = 0;
        for (int k = 0; k < batch.njobs; ++k) {
            const sw_kahan_job *job = &jobs[start + k];
            batch.acc[k] = job->acc;
            batch.comp[k] = job->comp;
            batch.g[k] = job->g;
            batch.n[k] = (long long)job->n;
            batch.stride[k][0] = (long long)job->acc_stride;
            batch.stride[k][1] = (long long)job->comp_stride;
            batch.stride[k][2] = (long long)job->g_stride;
            batch.dtype[k] = (int)job->g_dtype;
            batch.block_start[k] = blocks;
            long long need = (job->n + SW_KAHAN_THREADS - 1) / SW_KAHAN_THREADS;
            blocks += (int)(need < SW_KAHAN_MAX_BLOCKS_PER_JOB ? need : SW_KAHAN_MAX_BLOCKS_PER_JOB);
        }
        batch.block_start[batch.njobs] = blocks;
        if (blocks == 0) continue;
        SW_LAUNCH(sw_kahan_kernel, blocks, SW_KAHAN_THREADS, 0, s, batch, scale);
        sw_code rc = sw_cuda_fail(cudaGetLastError(), "launching the Kahan accumulation kernel", err);
        if (rc != SW_OK) return rc;
    }
    return SW_OK;
}
