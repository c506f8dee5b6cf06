/* sw_ssd.h - Mamba-2 (SSD) scan forward and adjoint backward.
 *
 * Per batch b, head h, head channel p, state n, step t (shapes as in mamba-ssm's
 * mamba_chunk_scan_combined; g = h / (heads / groups) is the head's B/C group):
 *     a          = exp(dt[b,t,h] * A[h])                        (one scalar A per head)
 *     s[p, n]    = a * s[p, n] + dt[b,t,h] * B[b,t,g,n] * x[b,t,h,p]   (s starts at h0[b,h,p,:] or 0)
 *     y[b,t,h,p] = sum_n C[b,t,g,n] * s[p, n] + D[h] * x[b,t,h,p]
 *     y         *= silu(z[b,t,h,p])                             (when z is given)
 * dt is the positive step (softplus and any clamp already applied by the caller).
 *
 * Tensors: x, z, y: (batch, len, heads, headdim); dt: (batch, len, heads); A, D: (heads);
 * B, C: (batch, len, groups, dstate); h0, hlast: (batch, heads, headdim, dstate);
 * ckpt: (batch, heads, headdim, nblk, dstate), nblk = ceil(len / block): the state entering
 * each block of `block` steps.
 *
 * Precision: the compute type T is double for float64 inputs and float otherwise (x, dt, B,
 * C, z may be float32, float16 or bfloat16 and are read as float32). A, D, h0 and every output
 * (y, hlast, ckpt and all gradients) are in T; the Python wrapper casts back.
 *
 * Backward: given dy (batch,len,heads,headdim) and dhlast (batch,heads,headdim,dstate) (or NULL),
 * runs the adjoint mu_t = dL/ds_t backwards, recomputing the states of each block from ckpt:
 *     mu_t = C_t g_t + exp(dt_{t+1} A) mu_{t+1},   g_t = dy_t * silu(z_t)
 * and writes dx, dz (batch,len,heads,headdim); ddt (batch,len,heads; the caller zeroes it: the
 * headdim rows of a head add into it); dB, dC (batch,len,groups,dstate; accumulated, the caller
 * zeroes them); dA, dD (batch,heads,headdim) per row (the caller sums); dh0 (batch,heads,headdim,dstate).
 *
 * One "row" is one (b, h, p): its dstate-long state runs sequentially over t. The per-row loops
 * below are shared by the CPU driver (ssd_cpu.c: OpenMP over the heads of one (batch, group),
 * rows of a head in one thread) and the CUDA driver (cuda/ssd.cu: one thread per row, atomics
 * for the sums over rows).
 */
#ifndef SEQWRAP_SSD_H
#define SEQWRAP_SSD_H

#include <math.h>
#include <stdint.h>

#include "sw_elem.h"
#include "sw_portable.h"
#include "sw_status.h"
#include "sw_tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SW_SSD_MAX_DSTATE 256

typedef struct {
    int64_t batch, len, heads, headdim, groups, dstate, block;
    sw_dtype io_dtype;   /* dtype of x, dt, B, C, z */
    int f64;             /* 1: T = double (float64 inputs), 0: T = float */
    /* inputs */
    const void *x, *dt, *B, *C, *z;   /* z may be NULL */
    const void *A, *D, *h0;           /* T; D, h0 may be NULL */
    /* forward outputs (T) */
    void *y, *hlast, *ckpt;
    /* backward inputs (T) */
    const void *dy, *dhlast;          /* dhlast may be NULL */
    /* backward outputs (T) */
    void *dx, *ddt, *dz, *dB, *dC, *dA, *dD, *dh0;   /* dz NULL without z */
    void *work;   /* CUDA only: (batch*heads*headdim) * (block+2) * dstate T scratch */
} sw_ssd_params;

SW_HOSTDEV int64_t sw_ssd_nblk(const sw_ssd_params *p) { return (p->len + p->block - 1) / p->block; }

#if defined(__CUDA_ARCH__)
#define SW_SSD_ATOMIC_ADD(ptr, v) atomicAdd((ptr), (v))
#else
#define SW_SSD_ATOMIC_ADD(ptr, v) (*(ptr) += (v))
#endif

#define SW_SSD_CAT_(a, b) a##b
#define SW_SSD_CAT(a, b) SW_SSD_CAT_(a, b)

/* float32 compute: inputs may be float32, float16 or bfloat16. */
#define SSD_T float
#define SSD_SUF _f32
#define SSD_LOAD(ptr, i) sw_load_as_float((ptr), p->io_dtype, (i))
#define SSD_EXP expf
#include "sw_ssd_impl.h"
#undef SSD_T
#undef SSD_SUF
#undef SSD_LOAD
#undef SSD_EXP

/* float64 compute: every input is float64. */
#define SSD_T double
#define SSD_SUF _f64
#define SSD_LOAD(ptr, i) (((const double *)(ptr))[(i)])
#define SSD_EXP exp
#include "sw_ssd_impl.h"
#undef SSD_T
#undef SSD_SUF
#undef SSD_LOAD
#undef SSD_EXP

sw_code sw_ssd_fwd_cpu(const sw_ssd_params *p, sw_error *err);
sw_code sw_ssd_bwd_cpu(const sw_ssd_params *p, sw_error *err);

/* CUDA launchers (cuda/ssd.cu; ssd_cuda_absent.c without nvcc). p->work must hold
 * (batch*heads*headdim)*(block+2)*dstate values. They never synchronise the host. */
sw_code sw_ssd_fwd_cuda(const sw_ssd_params *p, int device, void *stream, sw_error *err);
sw_code sw_ssd_bwd_cuda(const sw_ssd_params *p, int device, void *stream, sw_error *err);

#ifdef __cplusplus
}
#endif

#endif /* SEQWRAP_SSD_H */
