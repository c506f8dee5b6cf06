/* scan.h - one selective scan serving Mamba-1 and Mamba-2 (SSD), forward and adjoint backward.
 *
 * The recurrence, per batch b, head h, head channel p, state n, step t (g = h / (heads/groups)
 * is the head's B/C group):
 *     a[n]       = exp(dt[b,t,h] * A[h,n])           0 at a document reset (see below)
 *     s[p,n]     = a[n] * s[p,n] + dt[b,t,h] * B[b,t,g,n] * x[b,t,h,p]   (s starts at h0 or 0)
 *     y[b,t,h,p] = (sum_n C[b,t,g,n] * s[p,n] + D[h] * x[b,t,h,p]) * silu(z[b,t,h,p])
 * dt is the positive step (softplus already applied by the caller).
 *
 * The two front ends are two ways of filling the same struct:
 *   Mamba-1 (selective_scan): u (batch, dim, len) is x with heads = dim and headdim = 1; A is
 *     (dim, dstate) per state (a_scalar = 0); B, C (batch, dstate, len) are one group; dt is per
 *     channel = per head. Strides say where len and the channel sit in u's layout.
 *   Mamba-2 (ssd_scan): x (batch, len, heads, headdim); A (heads,) one scalar per head
 *     (a_scalar = 1: exp(dt*A) is computed once per (head, step), not per state); B, C
 *     (batch, len, groups, dstate) with a group per heads/groups heads; dt (batch, len, heads).
 *
 * Layouts the kernels read through strides (elements):
 *   x, z, y, dy, dx, dz:  element [b,t,h,p] at b*sx[0] + t*sx[1] + h*sx[2] + p*sx[3]
 *   dt, ddt:              [b,t,h] at b*sdt[0] + t*sdt[1] + h*sdt[2]
 *   B, C, dB, dC:         [b,t,g,n] at b*sb[0] + t*sb[1] + g*sb[2] + n*sb[3]
 * and contiguous, per row r = (b*heads + h)*headdim + p ("rows" = batch*heads*headdim):
 *   A: (heads, na) with na = 1 (a_scalar) or dstate;  D: (heads,)
 *   h0, hlast, dhlast, dh0: (rows, dstate);  ckpt: (rows, nblk, dstate), nblk = ceil(len/block),
 *     the state entering each block of `block` steps;  dA: (rows, na);  dD: (rows,)
 *   reset: (batch, len) int32 or NULL: reset[b,t] != 0 marks the first step of a new document:
 *     the state entering t is zero (h0 dropped at t = 0), i.e. a = 0; no adjoint crosses it.
 *
 * Precision: compute type T is double for float64 inputs and float otherwise (x, dt, B, C, z may be
 * float32, float16 or bfloat16, read as float32). A, D, h0 and every output are in T.
 *
 * Backward: given dy and dhlast (or NULL) runs the adjoint mu_t = dL/ds_t backwards, recomputing
 * each block's states from ckpt:  mu_t = C_t g_t + a_{t+1} mu_{t+1},  g_t = dy_t * silu(z_t).
 * dx, dz and dA, dD, dh0 are written; ddt, dB, dC are accumulated (the caller zeroes them: ddt is a
 * sum over the head's channels, dB/dC over the group's channels).
 *   trunc > 0: truncated adjoint (adjoint sharding): mu_t sums only the losses of steps
 *     t..t+trunc-1: mu_t -= Phi(t,t+T) C_{t+T} g_{t+T}, Phi = exp(A * sum_{m=t+1}^{t+T} dt_m), or
 *     nothing when a reset lies in (t, t+T].
 *   grad_len < len: steps >= grad_len only feed the adjoint; their own contributions to every
 *     gradient but dh0 are zero.
 *
 * The per-head loops (scan_impl.h) are shared: the CPU (scan_cpu.c) runs all headdim rows of a
 * head in one call, so B_t, C_t and exp(dt*A) are loaded once per step for the whole head and the
 * loops over dstate vectorise; the GPU (scan.cu) runs one row per thread through the same code.
 */
#ifndef SEQWRAP_SCAN_SCAN_H
#define SEQWRAP_SCAN_SCAN_H

#include <math.h>
#include <stdint.h>

#include "sw_elem.h"
#include "sw_portable.h"
#include "sw_status.h"
#include "sw_tensor.h"
#include "ops.h"   /* the launchers sw_scan_fwd_cuda / sw_scan_bwd_cuda */

#ifdef __cplusplus
extern "C" {
#endif

#define SW_SCAN_MAX_DSTATE 256

typedef struct sw_scan_params {   /* tagged: core/ops.h declares the launchers with it */
    int64_t batch, len, heads, headdim, groups, dstate, block;
    int a_scalar;        /* 1: A[h] one value per head (Mamba-2); 0: A[h, n] per state (Mamba-1) */
    sw_dtype io_dtype;   /* dtype of x, dt, B, C, z */
    int f64;             /* 1: T = double (float64 inputs), 0: T = float */
    int64_t sx[4], sdt[3], sb[4];   /* strides, see above */
    /* inputs */
    const void *x, *dt, *B, *C, *z;   /* z may be NULL */
    const void *A, *D, *h0;           /* T; D, h0 may be NULL */
    const int32_t *reset;             /* (batch, len) or NULL */
    /* forward outputs (T) */
    void *y, *hlast, *ckpt;
    /* backward inputs (T) */
    const void *dy, *dhlast;          /* dhlast may be NULL */
    /* backward outputs (T) */
    void *dx, *ddt, *dz, *dB, *dC, *dA, *dD, *dh0;   /* dz NULL without z */
    int64_t trunc, grad_len;
    void *work;   /* CUDA only: rows * SW_SCAN_WORK(1, dstate, block) values of T */
} sw_scan_params;

/* Scratch values of T one call of the per-head loops needs for `np` rows. */
#define SW_SCAN_WORK(np, N, K) (((K) + 2) * (np) * (N) + 5 * (N))

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

/* A vectorisable sum over dstate: gcc reassociates it (OpenMP simd reduction); nvcc runs it as is. */
#if defined(_OPENMP) && !defined(__CUDACC__)
#define SW_SCAN_STR(x) #x
#define SW_SCAN_SIMD_SUM(a) _Pragma(SW_SCAN_STR(omp simd reduction(+ : a)))
#define SW_SCAN_SIMD_SUM2(a, b) _Pragma(SW_SCAN_STR(omp simd reduction(+ : a, b)))
#define SW_SCAN_SIMD _Pragma("omp simd")
#else
#define SW_SCAN_SIMD_SUM(a)
#define SW_SCAN_SIMD_SUM2(a, b)
#define SW_SCAN_SIMD
#endif

/* The per-head loops: inlined into each CPU caller (scan_cpu.c compiles them once per ISA). */
#if defined(__CUDACC__)
#define SW_SCAN_HEAD SW_HOSTDEV
#elif defined(__GNUC__)
#define SW_SCAN_HEAD static inline __attribute__((always_inline))
#else
#define SW_SCAN_HEAD static inline
#endif

#define SW_SCAN_CAT_(a, b) a##b
#define SW_SCAN_CAT(a, b) SW_SCAN_CAT_(a, b)

/* float32 compute: inputs may be float32, float16 or bfloat16. */
#define SCAN_T float
#define SCAN_SUF _f32
#define SCAN_LOAD(ptr, i) sw_load_as_float((ptr), p->io_dtype, (i))
#define SCAN_EXP expf
#include "scan_impl.h"
#undef SCAN_T
#undef SCAN_SUF
#undef SCAN_LOAD
#undef SCAN_EXP

/* float64 compute: every input is float64. */
#define SCAN_T double
#define SCAN_SUF _f64
#define SCAN_LOAD(ptr, i) (((const double *)(ptr))[(i)])
#define SCAN_EXP exp
#include "scan_impl.h"
#undef SCAN_T
#undef SCAN_SUF
#undef SCAN_LOAD
#undef SCAN_EXP

sw_code sw_scan_fwd_cpu(const sw_scan_params *p, sw_error *err);
sw_code sw_scan_bwd_cpu(const sw_scan_params *p, sw_error *err);
/* The CUDA launchers sw_scan_fwd_cuda / sw_scan_bwd_cuda (scan.cu; core/cuda_absent.c without nvcc)
 * are declared by core/ops.h (SW_LAUNCHER entries of ops.def). They never synchronise the host. */

#ifdef __cplusplus
}
#endif

#endif /* SEQWRAP_SCAN_SCAN_H */
