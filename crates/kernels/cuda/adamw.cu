// AdamW's update of an f32 parameter in two in-place passes (src/device_adamw.rs), compiled to PTX
// by crates/kernels/build.rs. The moments of a parameter of n elements are one buffer mv of 2n:
// m in mv[0..n], v in mv[n..2n].
//
// Every operation is an explicitly rounded IEEE one (no contraction into fused multiply-adds, no
// approximate division or square root), in the order of the CPU kernel
// (src/cpu/adamw.rs, AdamWCoefficients::moments and ::parameter) and of the tensor formulation it
// replaces: the three give the same bits.
//
// The dense kernels update element i of the parameter for every i < n. Each `_rows` kernel takes
// its dense twin's arguments followed by the rows, their element count and the row width, and
// updates the elements of `rows` (distinct, each below the parameter's rows; checked on the host):
// gradient element k belongs to row rows[k / width], column k % width.

__device__ __forceinline__ void moments_of(
    float* __restrict__ mv, unsigned long long n, unsigned long long i, float raw_g,
    float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float grad_scale
) {
    // g ← g·scale + 0 (gradient clipping's factor; 1 without)
    const float g = __fadd_rn(__fmul_rn(raw_g, grad_scale), 0.0f);
    const float m = mv[i];
    const float v = mv[n + i];
    // m ← (m·β₁ + 0) + (g·(1 − β₁) + 0)
    mv[i] = __fadd_rn(__fadd_rn(__fmul_rn(m, beta1), 0.0f), __fadd_rn(__fmul_rn(g, one_minus_beta1), 0.0f));
    // v ← (v·β₂ + 0) + ((g·g)·(1 − β₂) + 0)
    mv[n + i] = __fadd_rn(
        __fadd_rn(__fmul_rn(v, beta2), 0.0f),
        __fadd_rn(__fmul_rn(__fmul_rn(g, g), one_minus_beta2), 0.0f)
    );
}

__device__ __forceinline__ float parameter_of(
    float theta, float m, float v, float inv_bc1, float inv_bc2, float eps, float decay, float lr
) {
    // update = (m/(1 − β₁ᵗ) + 0) / (sqrt(v/(1 − β₂ᵗ) + 0)·1 + ε)
    const float m_hat = __fadd_rn(__fmul_rn(m, inv_bc1), 0.0f);
    const float v_hat = __fadd_rn(__fmul_rn(v, inv_bc2), 0.0f);
    const float update = __fdiv_rn(m_hat, __fadd_rn(__fmul_rn(__fsqrt_rn(v_hat), 1.0f), eps));
    // θ ← (θ·(1 − lr·λ) + 0) − (update·lr + 0)
    return __fsub_rn(__fadd_rn(__fmul_rn(theta, decay), 0.0f), __fadd_rn(__fmul_rn(update, lr), 0.0f));
}

extern "C" __global__ void adamw_moments_f32(
    float* __restrict__ mv, const float* __restrict__ grad, unsigned long long n,
    float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float grad_scale
) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        moments_of(mv, n, i, grad[i], beta1, one_minus_beta1, beta2, one_minus_beta2, grad_scale);
    }
}

extern "C" __global__ void adamw_moments_rows_f32(
    float* __restrict__ mv, const float* __restrict__ grad, unsigned long long n,
    float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float grad_scale,
    const unsigned int* __restrict__ rows, unsigned long long count, unsigned long long width
) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long k = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; k < count; k += stride) {
        const unsigned long long i = (unsigned long long)rows[k / width] * width + k % width;
        moments_of(mv, n, i, grad[k], beta1, one_minus_beta1, beta2, one_minus_beta2, grad_scale);
    }
}

extern "C" __global__ void adamw_parameter_f32(
    float* __restrict__ theta, const float* __restrict__ mv, unsigned long long n,
    float inv_bc1, float inv_bc2, float eps, float decay, float lr
) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        theta[i] = parameter_of(theta[i], mv[i], mv[n + i], inv_bc1, inv_bc2, eps, decay, lr);
    }
}

extern "C" __global__ void adamw_parameter_rows_f32(
    float* __restrict__ theta, const float* __restrict__ mv, unsigned long long n,
    float inv_bc1, float inv_bc2, float eps, float decay, float lr,
    const unsigned int* __restrict__ rows, unsigned long long count, unsigned long long width
) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long k = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; k < count; k += stride) {
        const unsigned long long i = (unsigned long long)rows[k / width] * width + k % width;
        theta[i] = parameter_of(theta[i], mv[i], mv[n + i], inv_bc1, inv_bc2, eps, decay, lr);
    }
}
