/* cuda_absent.c - stands in for the CUDA sources (csrc/cuda/) in a CPU-only build
 * (no nvcc found, or SEQWRAP_CUDA=0): every launcher reports that the CUDA
 * kernels are not built, so a CUDA tensor raises a clear Python error. */
#include <stdio.h>
#include <string.h>

#include "sw_cuda.h"

void sw_cuda_query(sw_cuda_info *info) {
    memset(info, 0, sizeof *info);
    snprintf(info->query_error_text, sizeof info->query_error_text,
             "seqwrap was built without CUDA kernels");
}

int sw_cuda_device_capability(int dev) {
    (void)dev;
    return -1;
}

static sw_code no_cuda(sw_error *err) {
    err->code = SW_ERR_NO_CUDA;
    snprintf(err->message, sizeof err->message,
             "seqwrap was built without CUDA kernels; rebuild with nvcc on PATH "
             "(and SEQWRAP_CUDA unset) to use CUDA tensors");
    return SW_ERR_NO_CUDA;
}

sw_code sw_kahan_accumulate_cuda(const sw_kahan_job *jobs, int njobs, float scale,
                                 int device, void *stream, sw_error *err) {
    (void)jobs; (void)njobs; (void)scale; (void)device; (void)stream;
    return no_cuda(err);
}

sw_code sw_xent_cuda(const sw_xent_job *job, int *error_flag, int device, void *stream, sw_error *err) {
    (void)job; (void)error_flag; (void)device; (void)stream;
    return no_cuda(err);
}

sw_code sw_lse_merge_cuda(const sw_lse_merge_job *job, int device, void *stream, sw_error *err) {
    (void)job; (void)device; (void)stream;
    return no_cuda(err);
}

sw_code sw_sample_chunks_cuda(const sw_sampler_params *params, int device, void *stream, sw_error *err) {
    (void)params; (void)device; (void)stream;
    return no_cuda(err);
}

sw_code sw_scan_fwd_cuda(const sw_scan_params *p, int device, void *stream, sw_error *err) {
    (void)p; (void)device; (void)stream;
    return no_cuda(err);
}

sw_code sw_scan_bwd_cuda(const sw_scan_params *p, int device, void *stream, sw_error *err) {
    (void)p; (void)device; (void)stream;
    return no_cuda(err);
}
