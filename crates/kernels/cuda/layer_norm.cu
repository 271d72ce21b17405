// LayerNorm of rows for scoring (src/device_layer_norm.rs), compiled to PTX by
// crates/kernels/build.rs:
//
//   s = x (+ a),   y = (s − mean(s)) / √(var(s) + eps) · w + b     over each row of `width`
//
// One block per row, blockDim.x a power of two (at most 256). Each thread sums its columns
// (c = t, t + blockDim.x, ...) in order, the block adds the threads' sums pairwise (s = blockDim/2,
// ..., 1: sums[t] += sums[t + s]). The row is centred twice, by its f32 mean and then by the mean
// of the centred values (the first mean's rounding, which a large mean beside a small spread makes
// matter), and the variance is the mean of the centred squares, so a large mean costs no digits.
// Every operation is an explicitly rounded IEEE one, in the order of
// the CPU mirror (`normalize_row`): the same bits.

#include "block_sum.cuh"

template <bool RESIDUAL>
__device__ __forceinline__ float input_at(const float* __restrict__ x, const float* __restrict__ a, size_t i) {
    return RESIDUAL ? __fadd_rn(x[i], a[i]) : x[i];
}

template <bool RESIDUAL>
__device__ void layer_norm_rows(
    const float* __restrict__ x, const float* __restrict__ a, const float* __restrict__ w,
    const float* __restrict__ b, unsigned int width, float eps, float* __restrict__ y
) {
    __shared__ float sums[256];
    const size_t row = (size_t)blockIdx.x * width;
    const float n = (float)width;
    float acc = 0.0f;
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        acc = __fadd_rn(acc, input_at<RESIDUAL>(x, a, row + c));
    }
    const float mean = __fdiv_rn(block_sum(sums, acc), n);
    // The mean of the centred row: the f32 mean's rounding, which matters beside a small spread.
    acc = 0.0f;
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        acc = __fadd_rn(acc, __fsub_rn(input_at<RESIDUAL>(x, a, row + c), mean));
    }
    const float shift = __fdiv_rn(block_sum(sums, acc), n);
    acc = 0.0f;
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        const float d = __fsub_rn(__fsub_rn(input_at<RESIDUAL>(x, a, row + c), mean), shift);
        acc = __fadd_rn(acc, __fmul_rn(d, d));
    }
    const float sigma = __fsqrt_rn(__fadd_rn(__fdiv_rn(block_sum(sums, acc), n), eps));
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        const float d = __fsub_rn(__fsub_rn(input_at<RESIDUAL>(x, a, row + c), mean), shift);
        y[row + c] = __fadd_rn(__fmul_rn(__fdiv_rn(d, sigma), w[c]), b[c]);
    }
}

extern "C" __global__ void layer_norm_f32(
    const float* x, const float* w, const float* b, unsigned int width, float eps, float* y
) {
    layer_norm_rows<false>(x, x, w, b, width, eps, y);
}

extern "C" __global__ void residual_layer_norm_f32(
    const float* x, const float* a, const float* w, const float* b, unsigned int width, float eps, float* y
) {
    layer_norm_rows<true>(x, a, w, b, width, eps, y);
}
