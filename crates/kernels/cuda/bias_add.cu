// y[r, c] ← y[r, c] + b[c] in place for a product y [rows, width] (src/device_bias_add.rs),
// then, with `relu`, y ← fmaxf(y, 0), compiled to PTX by crates/kernels/build.rs. A grid-stride
// loop over the rows·width elements; each sum is one rounded IEEE addition, as candle's broadcast
// addition computes it, and the ReLU is candle's CUDA ReLU (`fmaxf(x, 0)`: NaN becomes 0).

template <typename T>
__device__ __forceinline__ T relu_of(T v);
template <>
__device__ __forceinline__ float relu_of(float v) { return fmaxf(v, 0.0f); }
template <>
__device__ __forceinline__ double relu_of(double v) { return fmax(v, 0.0); }

template <typename T>
__device__ void bias_add(
    T* __restrict__ y, const T* __restrict__ b, unsigned long long n, unsigned long long width, unsigned int relu
) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T s = y[i] + b[i % width];
        y[i] = relu ? relu_of(s) : s;
    }
}

extern "C" __global__ void bias_add_f32(
    float* y, const float* b, unsigned long long n, unsigned long long width, unsigned int relu
) {
    bias_add(y, b, n, width, relu);
}

extern "C" __global__ void bias_add_f64(
    double* y, const double* b, unsigned long long n, unsigned long long width, unsigned int relu
) {
    bias_add(y, b, n, width, relu);
}
