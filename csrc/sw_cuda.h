/* sw_cuda.h - the C-callable surface of the CUDA part of the core.
 *
 * Implemented in the files of csrc/cuda/ when seqwrap is built with nvcc, and by
 * cuda_absent.c otherwise (every launcher then returns SW_ERR_NO_CUDA).
 * Launchers take the torch stream as an opaque pointer (cudaStream_t) and
 * the device index of their tensors; they never synchronise the host.
 */
#ifndef SEQWRAP_CUDA_H
#define SEQWRAP_CUDA_H

#include "sw_kahan.h"
#include "sw_sampler.h"
#include "scan/scan.h"
#include "sw_status.h"
#include "sw_lse_merge.h"
#include "sw_xent.h"

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

sw_code sw_kahan_accumulate_cuda(const sw_kahan_job *jobs, int njobs, float scale,
                                 int device, void *stream, sw_error *err);

/* error_flag: device int, set to 1 when a label is outside [0, V) (that row is then ignored). */
sw_code sw_xent_cuda(const sw_xent_job *job, int *error_flag, int device, void *stream, sw_error *err);

sw_code sw_lse_merge_cuda(const sw_lse_merge_job *job, int device, void *stream, sw_error *err);

/* Writes params->weights (device memory; probs too) on `stream`. */
sw_code sw_sample_chunks_cuda(const sw_sampler_params *params, int device, void *stream, sw_error *err);

/* Selective scan, both modes (scan/scan.h); p->work: rows * SW_SCAN_WORK(1, dstate, block) values. */
sw_code sw_scan_fwd_cuda(const sw_scan_params *p, int device, void *stream, sw_error *err);
sw_code sw_scan_bwd_cuda(const sw_scan_params *p, int device, void *stream, sw_error *err);

#ifdef __cplusplus
}
#endif

#endif /* SEQWRAP_CUDA_H */
