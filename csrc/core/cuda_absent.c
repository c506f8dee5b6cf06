/* cuda_absent.c - stands in for the CUDA sources in a build without nvcc (or SEQWRAP_CUDA=0):
 * the device queries report no CUDA, and every launcher listed in ops.def returns SW_ERR_NO_CUDA,
 * so a CUDA tensor raises a clear Python error. setup.py defines SEQWRAP_CUDA_ARCHS exactly when
 * it compiles the CUDA sources, so this file is empty in a CUDA build. */
#ifndef SEQWRAP_CUDA_ARCHS
#include <stdio.h>
#include <string.h>

#include "ops.h"
#include "sw_cuda.h"

void sw_cuda_query(sw_cuda_info *info) {
    memset(info, 0, sizeof *info);
    snprintf(info->query_error_text, sizeof info->query_error_text, "seqwrap was built without CUDA kernels");
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

#define SW_STUB(prefix, params)                                                                      \
    sw_code sw_##prefix##_cuda(const struct sw_##params##_params *p, const sw_launch *l, sw_error *err) { \
        (void)p;                                                                                     \
        (void)l;                                                                                     \
        return no_cuda(err);                                                                         \
    }
#define SW_STUB_1(prefix) SW_STUB(prefix, prefix)
#define SW_STUB_0(prefix)
#define SW_STUB_shared(prefix) /* stubbed by its SW_LAUNCHER entry */
#define SW_OP(name, prefix, has_cuda, doc) SW_STUB_##has_cuda(prefix)
#define SW_LAUNCHER(prefix, params) SW_STUB(prefix, params)
#include "ops.def"

#else
typedef int sw_cuda_absent_unused; /* ISO C forbids an empty translation unit */
#endif
