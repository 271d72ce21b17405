//! Shared building blocks for the rankstack layer crates.
//!
//! Every piece here exists exactly once in the workspace and is used by several layer crates:
//!
//! - [`BatchNorm`]: BatchNorm with running statistics kept as buffers outside the parameter store.
//! - [`LayerNorm`]: LayerNorm written with differentiable primitives (candle's fused
//!   `ops::layer_norm` records no backward pass).
//! - [`softmax()`]: a max-shifted softmax with a backward pass (candle's `softmax_last_dim` has none).
//! - [`softmax_last_dim_fused`]: a fused CPU softmax with a backward pass, for attention.
//! - [`loss`]: numerically stable binary cross-entropy with logits.
//! - [`Activation`]: the activation choices shared by all configs.
//! - [`init`]: Xavier/Glorot helpers and [`SeededVarMap`], a parameter store whose initial values are
//!   a pure function of a seed and each parameter's name (candle's CPU RNG cannot be seeded).
//! - [`Dropout`]: seeded, reproducible dropout; [`Reseed`]: per-step reseeding of every random
//!   stream of a model, which makes training reproducible and resumable without saving RNG state.
//! - [`Mlp`]: a stack of linear layers with activation, optional normalisation and dropout.
//! - [`shape`]: input-shape checks that produce errors naming the layer.
//! - [`checkpoint`]: loading named tensors into a parameter store, reporting every mismatch at once.
//! - [`finite`]: which named tensor holds an infinity or a NaN, checked on the tensors' device.
//! - [`batched_matmul()`]: many small matrix products in parallel (attention), with a backward pass.
//! - [`Linear`] and [`packed_matmul`]: linear layers whose weights a serving model packs once, in
//!   f32 or bf16, for an AVX-512 kernel ([`pack_linear_layers`], [`LinearLayers`]); in training
//!   the same kernel runs the forward and backward products (`fused_linear`, on the matrix-product
//!   engine in `gemm`).
//! - [`distinct_rows`]: gathering and scattering distinct rows with gathers both ways (candle's CUDA
//!   `index_add` runs serially over the rows).
//! - [`row_sparse`]: row-sparse gradients for embedding tables ([`RowGather`], [`RowGradient`]).
//! - [`device_memory`]: a device's capacity and the peak memory its tensors used (CUDA and CPU).
//! - [`memory`]: the allocator setting that keeps freed tensor memory for reuse (no page faults).
//! - [`KernelFloat`]: the `f32`/`f64` element types the fused CPU kernels are written over.
//! - [`testing`]: fixture loading and closeness checks for the PyTorch reference tests.
//!
//! Every layer constructor in the workspace takes a config and a [`candle_nn::VarBuilder`], returns
//! [`Result`] (invalid configs fail there), and implements [`candle_core::Module`] (or
//! [`candle_core::ModuleT`] when it behaves differently in training).

pub mod activation;
pub mod batch_norm;
pub mod batched_matmul;
pub mod checkpoint;
pub mod device_memory;
pub mod distinct_rows;
pub mod dropout;
pub mod error;
pub mod finite;
pub mod fused_layer_norm;
mod fused_linear;
pub mod fused_softmax;
mod gemm;
pub mod init;
pub mod init_scheme;
pub mod kernel_float;
pub mod layer_norm;
pub mod linear;
pub mod loss;
pub mod memory;
pub mod mlp;
pub mod packed_matmul;
pub mod reseed;
pub mod rng;
pub mod row_sparse;
pub mod shape;
pub mod softmax;
pub mod testing;

pub use activation::Activation;
pub use batch_norm::{BatchNorm, BatchNormConfig};
pub use batched_matmul::batched_matmul;
pub use dropout::Dropout;
pub use error::{Error, Result};
pub use fused_softmax::softmax_last_dim_fused;
pub use init::SeededVarMap;
pub use init_scheme::InitScheme;
pub use kernel_float::KernelFloat;
pub use layer_norm::{LayerNorm, LayerNormConfig};
pub use linear::{autocast_linear_layers, linear_xavier, pack_linear_layers, Linear, LinearLayers};
pub use mlp::{Mlp, MlpConfig, Normalization};
pub use reseed::Reseed;
pub use row_sparse::{RowGather, RowGradient};
pub use softmax::softmax;
