// cuda_common.cuh - helpers shared by the CUDA launchers: error reporting and
// a device guard. Launchers return sw_code; nothing here aborts.
#ifndef SEQWRAP_CUDA_COMMON_CUH
#define SEQWRAP_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stdio.h>

#include "sw_status.h"

// Fills err from a CUDA error and returns SW_ERR_CUDA; SW_OK if e == cudaSuccess.
static inline sw_code sw_cuda_fail(cudaError_t e, const char *what, sw_error *err) {
    if (e == cudaSuccess) return SW_OK;
    err->code = SW_ERR_CUDA;
    snprintf(err->message, sizeof err->message, "%s: %s (%s)", what,
             cudaGetErrorString(e), cudaGetErrorName(e));
    return SW_ERR_CUDA;
}

// Makes `device` current for the lifetime of the guard, then restores the
// caller's device. `status` is cudaSuccess unless switching failed.
struct SwDeviceGuard {
    int previous = -1;
    cudaError_t status = cudaSuccess;
    explicit SwDeviceGuard(int device) {
        status = cudaGetDevice(&previous);
        if (status == cudaSuccess && previous != device) status = cudaSetDevice(device);
        else previous = -1;
    }
    ~SwDeviceGuard() {
        if (previous >= 0) (void)cudaSetDevice(previous);
    }
};

#endif  // SEQWRAP_CUDA_COMMON_CUH
