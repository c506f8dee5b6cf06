/* sw_scan.h - selective scan (Mamba-1 SSM) forward and adjoint backward.
 *
 * Per batch b, channel d, state n, step t (shapes as in mamba-ssm):
 *     a      = exp(dt[b,d,t] * A[d,n])
 *     h[n]   = a * h[n] + dt[b,d,t] * B[b,n,t] * u[b,d,t]          (h starts at h0[b,d,:] or 0)
 *     y      = sum_n C[b,n,t] * h[n] + D[d] * u[b,d,t]
 *     y     *= silu(z[b,d,t])                                       (when z is given)
 * dt is the positive step (softplus already applied by the caller).
 *
 * Document resets (packed sequences, as mamba-ssm's varlen / seq_idx path): with reset given,
 * reset[b,t] != 0 marks the first step of a new document: the state entering step t is zero
 * (h0 is dropped when t = 0), i.e. a = 0 at that step. The backward follows from a = 0: no adjoint
 * crosses the reset (mu_{t-1} gets nothing from step t), and step t gives no dA / ddt through a.
 *
 * Tensors: u, dt, z, y: (batch, dim, len); A: (dim, dstate); B, C: (batch, dstate, len);
 * D: (dim); h0, hlast: (batch, dim, dstate); ckpt: (batch, dim, nblk, dstate) with
 * nblk = ceil(len / block): the state entering each block of `block` steps; reset: (batch, len)
 * int32 or NULL.
 *
 * Precision: "compute type" T is double for float64 inputs and float otherwise
 * (u, dt, B, C, z may be float32, float16 or bfloat16; they are read as float32).
 * A, D, h0 and every output (y, hlast, ckpt and all gradients) are in T; the
 * Python wrapper casts back to the input dtype.
 *
 * Backward: given dy (batch,dim,len) and dhlast (batch,dim,dstate) (or NULL), runs the
 * adjoint mu_t = dL/dh_t backwards, recomputing the states inside each block from ckpt:
 *     mu_t = C_t g_t + exp(dt_{t+1} A) mu_{t+1},   g_t = dy_t * silu(z_t)
 * and writes du, ddt, dz (batch,dim,len); dB, dC (batch,dstate,len; accumulated, the
 * caller zeroes them); dA (batch,dim,dstate) and dD (batch,dim) per batch row (the
 * caller sums over batch); dh0 (batch,dim,dstate).
 *   trunc > 0: truncated adjoint (adjoint sharding): mu_t only sums the losses of steps
 *       t..t+trunc-1, via mu_t = C_t g_t - Phi(t,t+trunc) C_{t+trunc} g_{t+trunc} + a_{t+1} mu_{t+1},
 *       Phi(t,t+T) = exp(A * sum_{m=t+1}^{t+T} dt_m), or 0 when a reset lies in (t, t+T].
 *   grad_len < len: steps >= grad_len are look-ahead only: they feed the adjoint but their
 *       own gradient contributions (du, ddt, dz, dB, dC, dA, dD) are zero.
 * The per-channel loops below are shared by the CPU kernel (scan_cpu.c, one OpenMP
 * iteration per (b,d)) and the CUDA kernel (cuda/scan.cu, one thread per (b,d)).
 */
#ifndef SEQWRAP_SCAN_H
#define SEQWRAP_SCAN_H

#include <math.h>
#include <stdint.h>

#include "sw_half.h"
#include "sw_kahan.h"
#include "sw_portable.h"
#include "sw_status.h"
#include "sw_tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SW_SCAN_MAX_DSTATE 256

typedef struct {
    int64_t batch, dim, dstate, len, block;
    sw_dtype io_dtype;   /* dtype of u, dt, B, C, z */
    int f64;             /* 1: T = double (float64 inputs), 0: T = float */
    /* inputs */
    const void *u, *dt, *B, *C, *z;   /* z may be NULL */
    const void *A, *D, *h0;           /* T; D, h0 may be NULL */
    const int32_t *reset;             /* (batch, len) document starts, or NULL (no reset) */
    /* forward outputs (T) */
    void *y, *hlast, *ckpt;
    /* backward inputs (T) */
    const void *dy, *dhlast;          /* dhlast may be NULL */
    /* backward outputs (T) */
    void *du, *ddt, *dz, *dB, *dC, *dA, *dD, *dh0;   /* dz NULL without z */
    int64_t trunc, grad_len;
    void *work;   /* CUDA only: (batch*dim) * (block+2) * dstate T scratch */
} sw_scan_params;

SW_HOSTDEV int64_t sw_scan_nblk(const sw_scan_params *p) { return (p->len + p->block - 1) / p->block; }

/* 1 when step t of batch row b starts a new document (its entering state is zero), else 0. */
SW_HOSTDEV int sw_scan_resets(const sw_scan_params *p, int64_t b, int64_t t) {
    return p->reset != NULL && p->reset[b * p->len + t] != 0;
}

#if defined(__CUDA_ARCH__)
#define SW_SCAN_ATOMIC_ADD(ptr, v) atomicAdd((ptr), (v))
#else
#define SW_SCAN_ATOMIC_ADD(ptr, v) (*(ptr) += (v))
#endif

#define SW_SCAN_CAT_(a, b) a##b
#define SW_SCAN_CAT(a, b) SW_SCAN_CAT_(a, b)

/* float32 compute: inputs may be float32, float16 or bfloat16. */
#define SCAN_T float
#define SCAN_SUF _f32
#define SCAN_LOAD(ptr, i) sw_load_as_float((ptr), p->io_dtype, (i))
#define SCAN_EXP expf
#include "sw_scan_impl.h"
#undef SCAN_T
#undef SCAN_SUF
#undef SCAN_LOAD
#undef SCAN_EXP

/* float64 compute: every input is float64. */
#define SCAN_T double
#define SCAN_SUF _f64
#define SCAN_LOAD(ptr, i) (((const double *)(ptr))[(i)])
#define SCAN_EXP exp
#include "sw_scan_impl.h"
#undef SCAN_T
#undef SCAN_SUF
#undef SCAN_LOAD
#undef SCAN_EXP

sw_code sw_scan_fwd_cpu(const sw_scan_params *p, sw_error *err);
sw_code sw_scan_bwd_cpu(const sw_scan_params *p, sw_error *err);

#ifdef __cplusplus
}
#endif

#endif /* SEQWRAP_SCAN_H */
