// sw_cuda_emu.h - the CUDA execution model on the host, for testing seqwrap's kernels without a GPU.
//
// Force-included (g++ -x c++ -include sw_cuda_emu.h) when tests/cuda_emu/build.py compiles a
// csrc/**/*.cu file for the host; never part of the shipped module. It defines __CUDACC__ and
// __CUDA_ARCH__ so that the shared headers take their device branches (atomicAdd, __fmul_rn, ...).
//
//   - a launch (SW_LAUNCH in csrc/cuda/cuda_common.cuh) runs the grid's blocks one after another
//     (order set by the schedule); a block's threads are fibers (emu_runtime.cpp) that switch only
//     at __syncthreads and warp shuffles, so __syncthreads is a real barrier and a shuffle is
//     warp-synchronous: every lane named in `mask` must arrive, with the same mask;
//   - the schedule picks the order in which runnable fibers (and blocks) run: in order, reversed,
//     or a seeded random permutation at every barrier and shuffle round;
//   - `__shared__ T x[N];` is rewritten by build.py into `static SwShared<T> x[N];`: each slot keeps
//     a shadow (last writer, last reader, barrier epoch) and a read of a slot another thread wrote
//     since the last barrier, or a write over another thread's unsynchronised read or write, is
//     reported (kernel, block, slot, threads);
//   - atomics are real (__atomic builtins); the CUDA runtime calls the launchers make are stubs.
// Reports are collected by the runtime and read by the tests (sw_emu_take_reports).
#ifndef SEQWRAP_CUDA_EMU_H
#define SEQWRAP_CUDA_EMU_H

#ifndef __cplusplus
#error "sw_cuda_emu.h is C++ (compile the .cu files with g++ -x c++)"
#endif

#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#define SW_CUDA_EMU 1

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- runtime interface (emu_runtime.cpp) -----------------------------------------------------------
extern "C" {
struct SwEmuThread;  // one fiber: its thread index and warp state
typedef void (*sw_emu_body)(void *closure);
// Runs `body` once per thread of every selected block; returns 0 or a cudaError_t value.
int sw_emu_launch(const char *kernel, dim3 grid, dim3 block, size_t dyn_smem, void *stream, sw_emu_body body,
                  void *closure);
void sw_emu_syncthreads(void);
// Warp shuffle: kind 0 idx, 1 up, 2 down, 3 xor; value travels as 8 raw bytes.
uint64_t sw_emu_shfl(unsigned mask, uint64_t value, int kind, int arg, int width);
void sw_emu_syncwarp(unsigned mask);
void sw_emu_report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void sw_emu_shared_read(void *shadow, const void *slot);
void sw_emu_shared_write(void *shadow, const void *slot);
void sw_emu_name_shared(const char *name, const void *base, size_t bytes, size_t elem);
void *sw_emu_dynamic_shared(void);
extern __thread uint3 sw_emu_tidx, sw_emu_bidx;
extern __thread dim3 sw_emu_bdim, sw_emu_gdim;
}

#define threadIdx sw_emu_tidx
#define blockIdx sw_emu_bidx
#define blockDim sw_emu_bdim
#define gridDim sw_emu_gdim
#define warpSize 32

static inline void __syncthreads(void) { sw_emu_syncthreads(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { sw_emu_syncwarp(mask); }

// ---- shared memory with a shadow for the race check ---------------------------------------------------
struct SwShadow {
    uint64_t write_epoch, read_epoch;
    int writer, reader;  // thread ids; reader -2: several threads read in read_epoch
};
template <typename T>
struct SwShared {
    T value;
    mutable SwShadow shadow;
    operator T() const {
        sw_emu_shared_read(&shadow, this);
        return value;
    }
    SwShared &operator=(T v) {
        sw_emu_shared_write(&shadow, this);
        value = v;
        return *this;
    }
    SwShared &operator=(const SwShared &o) { return *this = (T)o; }
};
// Registers a rewritten __shared__ declaration's name for the reports (build.py inserts it).
template <typename T, size_t N>
constexpr size_t sw_emu_elem_size(const T (&)[N]) { return sizeof(T); }
template <typename T>
constexpr size_t sw_emu_elem_size(const T &) { return sizeof(T); }
#define SW_EMU_NAME_SHARED(x) sw_emu_name_shared(#x, (const void *)&(x), sizeof(x), sw_emu_elem_size(x))

// ---- warp shuffles --------------------------------------------------------------------------------------
template <typename T>
static inline T sw_emu_shfl_t(unsigned mask, T v, int kind, int arg, int width) {
    static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
    uint64_t raw = 0;
    memcpy(&raw, &v, sizeof v);
    raw = sw_emu_shfl(mask, raw, kind, arg, width);
    T out;
    memcpy(&out, &raw, sizeof out);
    return out;
}
template <typename T> static inline T __shfl_sync(unsigned m, T v, int src, int w = 32) { return sw_emu_shfl_t(m, v, 0, src, w); }
template <typename T> static inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { return sw_emu_shfl_t(m, v, 1, (int)d, w); }
template <typename T> static inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { return sw_emu_shfl_t(m, v, 2, (int)d, w); }
template <typename T> static inline T __shfl_xor_sync(unsigned m, T v, int lm, int w = 32) { return sw_emu_shfl_t(m, v, 3, lm, w); }

// ---- atomics (real ones: several host threads may run blocks one day) --------------------------------------
template <typename T>
static inline T sw_emu_atomic_add_fp(T *p, T v) {
    T old, want;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do want = old + v;
    while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
static inline float atomicAdd(float *p, float v) { return sw_emu_atomic_add_fp(p, v); }
static inline double atomicAdd(double *p, double v) { return sw_emu_atomic_add_fp(p, v); }
static inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
static inline int atomicExch(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
static inline unsigned atomicExch(unsigned *p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
static inline int atomicMax(int *p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

// ---- float intrinsics the shared headers use --------------------------------------------------------------
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }

// ---- launches ------------------------------------------------------------------------------------------
template <typename F>
static void sw_emu_call_body(void *closure) { (*(F *)closure)(); }
template <typename F>
static int sw_emu_launch_f(const char *name, dim3 g, dim3 b, size_t smem, void *stream, F f) {
    return sw_emu_launch(name, g, b, smem, stream, &sw_emu_call_body<F>, &f);
}
// The kernel's arguments are evaluated once, at the launch (copied into the closure), as nvcc does.
#define SW_EMU_LAUNCH(kernel, grid, block, smem, stream, ...) \
    sw_emu_launch_f(#kernel, dim3(grid), dim3(block), (smem), (void *)(stream), [=]() { kernel(__VA_ARGS__); })

#endif  // SEQWRAP_CUDA_EMU_H
