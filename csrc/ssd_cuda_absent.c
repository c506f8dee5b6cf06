/* ssd_cuda_absent.c - stands in for cuda/ssd.cu in a build without nvcc: the SSD launchers
 * report that the CUDA kernels are not built, so a CUDA tensor raises a clear Python error.
 *
 * setup.py defines SEQWRAP_CUDA_ARCHS exactly when it compiles the CUDA sources, so this file
 * is empty in a CUDA build (kept apart from cuda_absent.c so the SSD op adds files only). */
#ifndef SEQWRAP_CUDA_ARCHS
#include <stdio.h>

#include "sw_ssd.h"

static sw_code ssd_no_cuda(sw_error *err) {
    err->code = SW_ERR_NO_CUDA;
    snprintf(err->message, sizeof err->message,
             "seqwrap was built without CUDA kernels; rebuild with nvcc on PATH "
             "(and SEQWRAP_CUDA unset) to use CUDA tensors");
    return SW_ERR_NO_CUDA;
}

sw_code sw_ssd_fwd_cuda(const sw_ssd_params *p, int device, void *stream, sw_error *err) {
    (void)p; (void)device; (void)stream;
    return ssd_no_cuda(err);
}

sw_code sw_ssd_bwd_cuda(const sw_ssd_params *p, int device, void *stream, sw_error *err) {
    (void)p; (void)device; (void)stream;
    return ssd_no_cuda(err);
}
#else
typedef int sw_ssd_cuda_absent_unused; /* ISO C forbids an empty translation unit */
#endif
