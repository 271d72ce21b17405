//! The CPU kernels. Each is one candle op (forward and backward) over contiguous f32 (and, for
//! exactness tests, f64) storage; the layers call them only on the CPU and fall back to composed
//! candle operations elsewhere.
//!
//! The packed matrix-product engine ([`gemm`]) has an AVX-512 and an AVX2 + FMA path ([`isa`]:
//! detected at run time, forced with `RANKSTACK_CPU=avx512|avx2|generic`; `candle` turns every
//! kernel off, for the graph a GPU runs: [`kernels_enabled`]);
//! [`gemm::packed_kernel_available`] says whether the active path has a kernel, and the callers
//! take candle's own product where it does not (the generic path, arm64). Kernel tests run under
//! every path this CPU supports ([`isa::for_each_supported_isa`]) and say which they skipped
//! ([`skipped`]) instead of passing silently.

pub mod adamw;
pub mod allocator;
pub mod gemm;
pub mod heap_count;
pub mod isa;
pub mod layer_norm;
pub mod linear;
pub mod load_elsewhere;
pub mod masked_max;
pub mod packed_attention;
pub mod packed_matmul;
pub mod pinning;
pub mod scale_by_mask;
mod small_product;
mod softmax_rows;
pub mod sum_of_squares;
mod worker_pool;

pub use gemm::{bf16_path_description, packed_kernel_available, KernelPath, WeightPrecision};
pub use isa::{for_each_supported_isa, kernels_enabled, kernels_run_on, with_isa, Isa};
pub use pinning::{start_pinned_pool, PinError};
pub use worker_pool::{on_worker_pool, on_worker_pool_for_rows, on_worker_pool_with_threads, SMALL_BATCH_ROWS};

/// Reports, on the test process's real standard error (past the test harness's capture), that
/// `test` was skipped because this CPU lacks `what`. For tests of ISA-specific paths.
pub fn skipped(test: &str, what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: this CPU has no {what}");
}
