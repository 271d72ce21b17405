// The f64 sum of squares of a tensor in block partials (src/device_sum_of_squares.rs), compiled
// to PTX by crates/kernels/build.rs.
//
// Block b of the grid (blockDim.x = 256 threads, a power of two) writes out[b]: thread t adds the
// squares of elements b·256 + t, b·256 + t + stride, ... (stride = the grid's threads) in f64, and
// the block adds its threads' sums pairwise (block_sum.cuh: s = 128, 64, ..., 1: sum[t] += sum[t + s]). Every
// operation is an explicitly rounded IEEE one (no fused multiply-add), so the CPU's mirror of this
// order gives the same bits.

#include "block_sum.cuh"

template <typename T>
__device__ void partials(double* __restrict__ out, const T* __restrict__ x, unsigned long long n) {
    __shared__ double sums[256];
    double acc = 0.0;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double v = (double)x[i];
        acc = __dadd_rn(acc, __dmul_rn(v, v));
    }
    const double total = block_sum(sums, acc);
    if (threadIdx.x == 0) {
        out[blockIdx.x] = total;
    }
}

extern "C" __global__ void sum_of_squares_partials_f32(double* out, const float* x, unsigned long long n) {
    partials(out, x, n);
}

extern "C" __global__ void sum_of_squares_partials_f64(double* out, const double* x, unsigned long long n) {
    partials(out, x, n);
}
