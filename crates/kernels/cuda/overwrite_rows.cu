// rankstack's CUDA kernels, compiled to PTX by crates/kernels/build.rs (the `cuda` feature).

// table[rows[i], c] = values[i, c] for every c < width: the optimizer's write-back of the rows a
// step updated (src/overwrite_rows.rs). The rows are distinct, so no two blocks write the same
// element. One block per row, its threads over the columns.
template <typename T>
__device__ void overwrite_rows(
    T* __restrict__ table,
    const unsigned int* __restrict__ rows,
    const T* __restrict__ values,
    unsigned int width
) {
    const size_t dst = (size_t)rows[blockIdx.x] * width;
    const size_t src = (size_t)blockIdx.x * width;
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        table[dst + c] = values[src + c];
    }
}

extern "C" __global__ void overwrite_rows_f32(
    float* table, const unsigned int* rows, const float* values, unsigned int width
) {
    overwrite_rows(table, rows, values, width);
}

extern "C" __global__ void overwrite_rows_f64(
    double* table, const unsigned int* rows, const double* values, unsigned int width
) {
    overwrite_rows(table, rows, values, width);
}
