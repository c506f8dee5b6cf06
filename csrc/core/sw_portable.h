/* sw_portable.h - qualifiers and exactly-rounded float ops shared by C and CUDA.
 *
 * SW_HOSTDEV marks small inline functions compiled for both the CPU (gcc,
 * C11) and the GPU (nvcc). SW_FMUL / SW_FADD / SW_FSUB are single IEEE
 * float32 operations that the compiler may not fuse into an FMA, so that the
 * CPU and the GPU perform bit-identical arithmetic. (gcc in -std=c11 mode
 * already uses -ffp-contract=off; nvcc would otherwise contract a*b+c.)
 */
#ifndef SEQWRAP_PORTABLE_H
#define SEQWRAP_PORTABLE_H

#ifdef __CUDACC__
#define SW_HOSTDEV __host__ __device__ __forceinline__
#else
#define SW_HOSTDEV static inline
#endif

#if defined(__CUDA_ARCH__)
#define SW_FMUL(a, b) __fmul_rn((a), (b))
#define SW_FADD(a, b) __fadd_rn((a), (b))
#define SW_FSUB(a, b) __fsub_rn((a), (b))
#else
#define SW_FMUL(a, b) ((float)(a) * (float)(b))
#define SW_FADD(a, b) ((float)(a) + (float)(b))
#define SW_FSUB(a, b) ((float)(a) - (float)(b))
#endif

#endif /* SEQWRAP_PORTABLE_H */
