// device_info.cu - what the CUDA runtime linked into seqwrap can see.
#include <string.h>

#include "../sw_cuda.h"
#include "cuda_common.cuh"

extern "C" void sw_cuda_query(sw_cuda_info *info) {
    memset(info, 0, sizeof *info);
    info->built = 1;
    (void)cudaRuntimeGetVersion(&info->runtime_version);
    (void)cudaDriverGetVersion(&info->driver_version);  // 0 when no driver is installed
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        info->query_error = (int)e;
        snprintf(info->query_error_text, sizeof info->query_error_text, "%s (%s)",
                 cudaGetErrorString(e), cudaGetErrorName(e));
        (void)cudaGetLastError();  // clear the sticky-free error so later calls start clean
        count = 0;
    }
    info->device_count = count;
}

extern "C" int sw_cuda_device_capability(int dev) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
        (void)cudaGetLastError();
        return -1;
    }
    return major * 10 + minor;
}
