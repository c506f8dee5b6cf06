/* sw_cuda.h - device queries of the CUDA part of the core (every op's launcher is declared by
 * core/ops.h, generated from core/ops.def).
 *
 * Implemented in csrc/cuda/ when seqwrap is built with nvcc, and by core/cuda_absent.c otherwise.
 */
#ifndef SEQWRAP_CUDA_H
#define SEQWRAP_CUDA_H

#include "sw_status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Facts about the CUDA build and the machine, for seqwrap.cuda_status(). */
typedef struct {
    int built;                 /* 1 if the kernels were compiled in */
    int runtime_version;       /* CUDA runtime linked in, e.g. 13000; 0 if not built */
    int driver_version;        /* highest CUDA version the driver supports; 0 if none */
    int device_count;          /* devices the runtime can see; 0 on error */
    int query_error;           /* cudaError_t of cudaGetDeviceCount, 0 if fine */
    char query_error_text[128];
} sw_cuda_info;

void sw_cuda_query(sw_cuda_info *info);

/* Compute capability (major*10+minor) of device `dev`, or -1. */
int sw_cuda_device_capability(int dev);

#ifdef __cplusplus
}
#endif

#endif /* SEQWRAP_CUDA_H */
