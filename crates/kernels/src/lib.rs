//! rankstack's compute kernels: every hand-written op of the workspace, and the only crate with
//! `unsafe` code (each `unsafe` block states why it is sound; every `unsafe fn` has a `# Safety`
//! section).
//!
//! The layer crates compose candle operations and call in here where a fused kernel pays; they
//! contain no `unsafe` at all (`#![forbid(unsafe_code)]`, checked by `cargo xtask verify`). Each
//! kernel is a candle `CustomOp` (or `InplaceOp`) with its backward pass, tested in this crate
//! against a scalar f64 oracle.
//!
//! - [`cpu`]: the CPU side.
//!   - [`cpu::gemm`]: the packed matrix-product engine (AVX-512 micro-kernels, f32 and bf16).
//!   - [`cpu::packed_matmul`]: weights packed once for serving ([`cpu::packed_matmul::PackedWeight`]).
//!   - [`cpu::linear`]: `y = x Wᵀ + b` and both backward products on the engine, for training.
//!   - [`cpu::layer_norm`]: fused LayerNorm with its analytic backward pass.
//!   - [`cpu::packed_attention`]: attention over packed variable-length sequences.
//!   - [`cpu::masked_max`]: max-pooling over the unmasked positions of a sequence.
//!   - [`cpu::scale_by_mask`]: dropout's multiply by host-drawn multipliers.
//!   - [`cpu::adamw`]: the AdamW update of one f32 tensor in place.
//!   - [`cpu::allocator`]: the allocator setting that keeps freed tensor memory for reuse.
//! - `cuda` (feature `cuda`): the CUDA side: the memory pool's high-water mark.
//!   Every kernel of `cuda/*.cu` is also compiled as C++ and run on the CPU in the tests
//!   (`cuda_on_host`, with `cuda/host/`), against its CPU mirror bit for bit, so each kernel's
//!   indexing and arithmetic are tested on machines without a GPU.
//! - [`device_adamw`]: AdamW's update off the CPU kernels in two in-place passes (moments, then
//!   parameter), the CPU kernel's arithmetic bit for bit; on CUDA `cuda/adamw.cu`.
//! - [`device_bias_add`]: a linear layer's bias added to its fresh product in place off the CPU
//!   kernels (scoring: one full-size write per layer less); on CUDA `cuda/bias_add.cu`.
//! - [`device_copies`]: device values derived from an immutable owner (a batch's packed
//!   sequences), made once per device instead of once per layer.
//! - [`device_embedding_bag`]: a sparse feature's bags gathered, weighted and summed in one launch
//!   off the CPU kernels (scoring); on CUDA `cuda/embedding_bag.cu`.
//! - [`device_layer_norm`]: LayerNorm of rows (with an optional residual input) off the CPU kernels
//!   for scoring, one launch writing the output alone; on CUDA `cuda/layer_norm.cu`.
//! - [`device_packed_attention`]: scoring's attention over packed sequences off the CPU kernels,
//!   forward only, one launch per layer and nothing of size `L²` written; on CUDA
//!   `cuda/packed_attention.cu`.
//! - [`device_sum_of_squares`]: the f64 sum of squares of many tensors off the CPU kernels, one
//!   launch per tensor into block partials (the squared gradient norm); on CUDA
//!   `cuda/sum_of_squares.cu`.
//! - [`distinct_rows`]: gathering and scattering distinct rows with gathers both ways (any device:
//!   candle's CUDA `index_add` runs serially over the rows).
//! - [`overwrite_rows`]: new values written into some rows of a matrix in place (the row-sparse
//!   optimizer's write-back on the device), one block per row on CUDA (`cuda/overwrite_rows.cu`).
//! - [`repeated_rows`]: gathering rows that repeat (embedding lookups) with a segmented-sum backward
//!   pass, bit-equal to `index_add`'s; on CUDA one block per row (`cuda/segment_sum.cu`, compiled by
//!   `build.rs`).
//! - [`host_transfer`]: every copy of tensor values between the host and a device, through one
//!   place, so that a test can list a step's transfers (on a GPU a read back is a copy and a wait).
//! - [`index_stage`]: `u32` index arrays of many consumers (lookups, chunk maps, row write-backs)
//!   staged on the host and copied to a device in one upload, each consumer taking views of it.
//! - [`float`]: the `f32`/`f64` element types ([`KernelFloat`]) the CPU kernels are written over,
//!   reading a tensor's CPU values, and one dispatch from a storage to the typed kernel.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks, missing_docs)]

mod auxiliary;
mod block_sum;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(test)]
mod cuda_on_host;
pub mod device_adamw;
pub mod device_bias_add;
pub mod device_copies;
pub mod device_embedding_bag;
pub mod device_layer_norm;
pub mod device_packed_attention;
pub mod device_sum_of_squares;
pub mod distinct_rows;
pub mod float;
pub mod host_transfer;
pub mod index_stage;
#[cfg(any(test, feature = "cuda"))]
mod launch_shape;
#[cfg(test)]
mod oracle;
pub mod overwrite_rows;
pub mod repeated_rows;
mod row_gather_op;

pub use float::KernelFloat;
