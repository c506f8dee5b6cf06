// block_reduce.cuh - sum and max over a thread block (warp shuffles, then one warp).
// Every thread of the block must call them; every thread gets the result.
#ifndef SEQWRAP_BLOCK_REDUCE_CUH
#define SEQWRAP_BLOCK_REDUCE_CUH

template <typename R>
struct SwSumOp {
    __device__ R operator()(R a, R b) const { return a + b; }
};
template <typename R>
struct SwMaxOp {
    __device__ R operator()(R a, R b) const { return a > b ? a : b; }
};

// `scratch` holds at least 32 values in shared memory; blockDim.x is a multiple of 32;
// `identity` is the neutral element of op (0 for sum, -inf for max). S is R, or under the host
// emulation (tests/cuda_emu) R wrapped with its race-check shadow.
template <typename R, typename Op, typename S>
__device__ R sw_block_reduce(R v, S *scratch, Op op, R identity) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : identity;
    for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

#endif  // SEQWRAP_BLOCK_REDUCE_CUH
