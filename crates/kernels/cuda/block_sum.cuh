// The reduction of a CUDA block's per-thread sums that the kernels share and their CPU mirrors
// reproduce (src/block_sum.rs, `pairwise_block_sum`): pairwise, halving (s = blockDim/2, ..., 1:
// sums[t] += sums[t + s]), each addition an explicitly rounded IEEE one. blockDim.x must be a
// power of two, at most the length of `sums`.
#pragma once

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// The sum of the block's `acc`s, in every thread. Every thread has read it before `sums` can be
// written again.
template <typename T>
__device__ __forceinline__ T block_sum(T* sums, T acc) {
    sums[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            sums[threadIdx.x] = add_rn(sums[threadIdx.x], sums[threadIdx.x + s]);
        }
        __syncthreads();
    }
    const T total = sums[0];
    __syncthreads();
    return total;
}
