// cuda_common.cuh - helpers shared by the CUDA launchers: error reporting and
// a device guard. Launchers return sw_code; nothing here aborts.
#ifndef SEQWRAP_CUDA_COMMON_CUH
#define SEQWRAP_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stdio.h>

#include "sw_status.h"

// The one launch form of the kernels: nvcc's <<<>>> on a CUDA build, the host emulation of the CUDA
// execution model (tests/cuda_emu/sw_cuda_emu.h, force-included) in the emulated test build.
#ifdef SW_CUDA_EMU
#define SW_LAUNCH(kernel, grid, block, smem, stream, ...) \
    ((void)SW_EMU_LAUNCH(kernel, grid, block, smem, stream, __VA_ARGS__))
#else
#define SW_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

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
