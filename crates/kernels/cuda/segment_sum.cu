// rankstack's CUDA kernels, compiled to PTX by crates/kernels/build.rs (the `cuda` feature).

// out[s, c] = sum over i in [starts[s], starts[s + 1]) of src[order[i], c], added in that order
// (ascending positions: the order of a serial index_add, so the sums are bit-equal to it).
// One block per segment, its threads over the columns.
extern "C" __global__ void segment_sum_rows_f32(
    const float* __restrict__ src,
    const unsigned int* __restrict__ order,
    const unsigned int* __restrict__ starts,
    unsigned int width,
    float* __restrict__ out
) {
    const unsigned int segment = blockIdx.x;
    const unsigned int begin = starts[segment];
    const unsigned int end = starts[segment + 1];
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        float acc = 0.0f;
        for (unsigned int i = begin; i < end; ++i) {
            acc += src[(size_t)order[i] * width + c];
        }
        out[(size_t)segment * width + c] = acc;
    }
}
