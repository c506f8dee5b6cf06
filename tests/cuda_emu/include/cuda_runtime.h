// cuda_runtime.h for the host emulation (tests/cuda_emu): the runtime calls seqwrap's launchers make.
#ifndef SEQWRAP_CUDA_EMU_RUNTIME_H
#define SEQWRAP_CUDA_EMU_RUNTIME_H
#include <stddef.h>

#include "../sw_cuda_emu.h"

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorLaunchFailure = 719,
    cudaErrorNoDevice = 100,
} cudaError_t;
typedef struct CUstream_st *cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };

extern "C" {
cudaError_t cudaGetDevice(int *d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetLastError(void);
cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaRuntimeGetVersion(int *v);
cudaError_t cudaDriverGetVersion(int *v);
cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int d);
cudaError_t cudaMemsetAsync(void *p, int value, size_t n, cudaStream_t s);
const char *cudaGetErrorString(cudaError_t e);
const char *cudaGetErrorName(cudaError_t e);
}
#endif
