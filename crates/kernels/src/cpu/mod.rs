//! The CPU kernels. Each is one candle op (forward and backward) over contiguous f32 (and, for
//! exactness tests, f64) storage; the layers call them only on the CPU and fall back to composed
//! candle operations elsewhere.
//!
//! The packed matrix-product engine ([`gemm`]) needs x86-64 with AVX-512F (and AVX512-BF16 for bf16
//! weights): [`gemm::packed_kernel_available`] says whether this CPU has it, and the callers take
//! candle's own product where it does not. Tests that need a kernel this CPU lacks say so in their
//! output ([`skipped`]) instead of passing silently.

pub mod adamw;
pub mod allocator;
pub mod gemm;
pub mod layer_norm;
pub mod linear;
pub mod masked_max;
pub mod packed_attention;
pub mod packed_matmul;
pub mod scale_by_mask;

pub use gemm::{packed_kernel_available, WeightPrecision};

/// Reports, on the test process's real standard error (past the test harness's capture), that
/// `test` was skipped because this CPU lacks `what`. For tests of ISA-specific paths.
pub fn skipped(test: &str, what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: this CPU has no {what}");
}
