// Pooled embedding bags for scoring (src/device_embedding_bag.rs), compiled to PTX by
// crates/kernels/build.rs:
//
//   out[b, c] = Σ_j weights[b·L + j] · table[rows[b·L + j], c]      (j = 0 .. L, in order)
//
// One block per bag, its threads over the columns. Each product and sum is one rounded IEEE
// operation, in the order of the CPU mirror (`pool_bag`): the same bits. The rows are below the
// table's (checked on the host).
extern "C" __global__ void embedding_bag_f32(
    const float* __restrict__ table,
    const unsigned int* __restrict__ rows,
    const float* __restrict__ weights,
    unsigned int bag_len,
    unsigned int width,
    float* __restrict__ out
) {
    const size_t bag = (size_t)blockIdx.x * bag_len;
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        float acc = 0.0f;
        for (unsigned int j = 0; j < bag_len; ++j) {
            acc = __fadd_rn(acc, __fmul_rn(weights[bag + j], table[(size_t)rows[bag + j] * width + c]));
        }
        out[(size_t)blockIdx.x * width + c] = acc;
    }
}
