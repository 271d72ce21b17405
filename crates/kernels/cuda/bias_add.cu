// y[r, c] ← y[r, c] + b[c] in place for a product y [rows, width] (src/device_bias_add.rs),
// compiled to PTX by crates/kernels/build.rs. A grid-stride loop over the rows·width elements;
// each sum is one rounded IEEE addition, as candle's broadcast addition computes it.

template <typename T>
__device__ void bias_add(T* __restrict__ y, const T* __restrict__ b, unsigned long long n, unsigned long long width) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = y[i] + b[i % width];
    }
}

extern "C" __global__ void bias_add_f32(float* y, const float* b, unsigned long long n, unsigned long long width) {
    bias_add(y, b, n, width);
}

extern "C" __global__ void bias_add_f64(double* y, const double* b, unsigned long long n, unsigned long long width) {
    bias_add(y, b, n, width);
}
