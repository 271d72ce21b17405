// Scaled dot-product attention over packed variable-length sequences, forward only (scoring: no
// gradient), compiled to PTX by crates/kernels/build.rs (src/device_packed_attention.rs).
//
// q, k, v and out are the packed rows [R, d] (d = heads · DH; head h is columns h·DH .. (h+1)·DH);
// sequence s owns rows offsets[s] .. offsets[s + 1]; key_bias[j] is added to every score of key j
// (0 attend, −∞ hidden). Block b attends sequence b / heads, head b % heads; its threads take the
// sequence's query rows in turn. A thread keeps its query row and its output in registers (DH is
// a template argument: one kernel per head width) and reads the keys and values of its sequence,
// which the other threads of its warp read at the same time (one broadcast load):
//
//   m   = max_j s_j,   s_j = (Σ_c q_c·k_jc)·scale + key_bias_j     (pass 1)
//   out = (Σ_j e^(s_j − m)·v_j) / Σ_j e^(s_j − m)                   (pass 2, s_j computed again)
//
// Nothing of size L² is written. Every operation is an explicitly rounded IEEE one, in the order
// of the CPU mirror (device_packed_attention.rs, `attend_row`); only expf may differ between the
// GPU and the host's libm (a few ulp). A row whose keys are all hidden gets NaN, as the softmax of
// the composed attention gives it.

template <int DH>
__device__ __forceinline__ float score_of(const float* qr, const float* __restrict__ kj, float scale, float bias) {
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < DH; ++c) {
        dot = __fmaf_rn(qr[c], kj[c], dot);
    }
    return __fadd_rn(__fmul_rn(dot, scale), bias);
}

template <int DH>
__device__ void attend(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const unsigned int* __restrict__ offsets, const float* __restrict__ key_bias,
    unsigned int heads, float scale, float* __restrict__ out
) {
    const unsigned int s = blockIdx.x / heads;
    const unsigned int h = blockIdx.x % heads;
    const unsigned int begin = offsets[s];
    const unsigned int end = offsets[s + 1];
    const size_t d = (size_t)heads * DH;
    const size_t column = (size_t)h * DH;
    for (unsigned int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        float qr[DH];
#pragma unroll
        for (int c = 0; c < DH; ++c) {
            qr[c] = q[i * d + column + c];
        }
        float m = __int_as_float(0xff800000);  // −∞
        for (unsigned int j = begin; j < end; ++j) {
            const float sj = score_of<DH>(qr, k + j * d + column, scale, key_bias[j]);
            m = sj > m ? sj : m;
        }
        float sum = 0.0f;
        float acc[DH];
#pragma unroll
        for (int c = 0; c < DH; ++c) {
            acc[c] = 0.0f;
        }
        for (unsigned int j = begin; j < end; ++j) {
            const float p = expf(__fsub_rn(score_of<DH>(qr, k + j * d + column, scale, key_bias[j]), m));
            sum = __fadd_rn(sum, p);
            const float* vj = v + j * d + column;
#pragma unroll
            for (int c = 0; c < DH; ++c) {
                acc[c] = __fmaf_rn(p, vj[c], acc[c]);
            }
        }
#pragma unroll
        for (int c = 0; c < DH; ++c) {
            out[i * d + column + c] = __fdiv_rn(acc[c], sum);
        }
    }
}

// One kernel per head width (src/device_packed_attention.rs, HEAD_WIDTHS).
#define ATTENTION_PARAMETERS                                                                                    \
    const float* q, const float* k, const float* v, const unsigned int* offsets, const float* key_bias,        \
        unsigned int heads, float scale, float* out
#define ATTENTION_ARGUMENTS q, k, v, offsets, key_bias, heads, scale, out

extern "C" __global__ void packed_attention_f32_dh8(ATTENTION_PARAMETERS) { attend<8>(ATTENTION_ARGUMENTS); }
extern "C" __global__ void packed_attention_f32_dh16(ATTENTION_PARAMETERS) { attend<16>(ATTENTION_ARGUMENTS); }
extern "C" __global__ void packed_attention_f32_dh24(ATTENTION_PARAMETERS) { attend<24>(ATTENTION_ARGUMENTS); }
extern "C" __global__ void packed_attention_f32_dh32(ATTENTION_PARAMETERS) { attend<32>(ATTENTION_ARGUMENTS); }
extern "C" __global__ void packed_attention_f32_dh48(ATTENTION_PARAMETERS) { attend<48>(ATTENTION_ARGUMENTS); }
extern "C" __global__ void packed_attention_f32_dh64(ATTENTION_PARAMETERS) { attend<64>(ATTENTION_ARGUMENTS); }
extern "C" __global__ void packed_attention_f32_dh96(ATTENTION_PARAMETERS) { attend<96>(ATTENTION_ARGUMENTS); }
extern "C" __global__ void packed_attention_f32_dh128(ATTENTION_PARAMETERS) { attend<128>(ATTENTION_ARGUMENTS); }
