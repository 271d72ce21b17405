// What rankstack's kernels (cuda/*.cu) use of CUDA, for the host: the kernels compile as C++ with
// this header and run on the CPU under runner.cpp, so the tests check every kernel's indexing and
// arithmetic against its CPU mirror bit for bit on machines without a GPU
// (crates/kernels/src/cuda_on_host.rs).
//
// Each CUDA thread runs as a fiber (ucontext) on one OS thread: a block's threads run one after
// another up to a __syncthreads(), where each yields to the next, so a block's threads meet at
// every barrier as on a GPU. Blocks run one after another. The rounding intrinsics are the plain
// IEEE operations: runner.cpp is compiled without contraction into fused multiply-adds
// (-ffp-contract=off) on x86-64's SSE arithmetic, which rounds every operation to its type.
#pragma once

#include <math.h>

#include <cmath>
#include <cstring>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct Dim3 {
    unsigned int x, y, z;
};

// The running thread's coordinates, set by the scheduler every time it resumes a thread.
inline Dim3 gridDim, blockDim, blockIdx, threadIdx;

namespace cuda_on_host {
// Suspends the running thread until every thread of its block has reached the barrier.
void syncthreads();
}  // namespace cuda_on_host

inline void __syncthreads() { cuda_on_host::syncthreads(); }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __int_as_float(int bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
