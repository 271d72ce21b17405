//! Shared building blocks for the rankstack layer crates.
//!
//! Every piece here exists exactly once in the workspace and serves the layer crates (the fused
//! kernels some of them call live in `rankstack-kernels`, the only crate with `unsafe` code):
//!
//! - [`BatchNorm`]: BatchNorm with running statistics kept as buffers outside the parameter store.
//! - [`LayerNorm`]: LayerNorm written with differentiable primitives (candle's fused
//!   `ops::layer_norm` records no backward pass).
//! - [`softmax()`]: a max-shifted softmax with a backward pass (candle's `softmax_last_dim` has none).
//! - [`loss`]: numerically stable binary cross-entropy with logits.
//! - [`Activation`]: the activation choices shared by all configs.
//! - [`init`]: Xavier/Glorot helpers and [`SeededVarMap`], a parameter store whose initial values are
//!   a pure function of a seed and each parameter's name (candle's CPU RNG cannot be seeded).
//! - [`Dropout`]: seeded, reproducible dropout; [`Reseed`]: per-step reseeding of every random
//!   stream of a model, which makes training reproducible and resumable without saving RNG state.
//! - [`Mlp`]: a stack of linear layers with activation, optional normalisation and dropout.
//! - [`shape`]: input-shape checks that produce errors naming the layer.
//! - [`checkpoint`]: loading named tensors into a parameter store, reporting every mismatch at once.
//! - [`tensor_write`]: atomic, checksummed, byte-reproducible safetensors writing.
//! - [`layer_checkpoint`]: a single layer saved on its own (`layer.json` + `model.safetensors`).
//! - [`state_dict`]: importing a peer framework's state dict (renaming, reshaping, splitting,
//!   checking every tensor) and single-layer checkpoints.
//! - [`finite`]: which named tensor holds an infinity or a NaN, checked on the tensors' device.
//! - [`Linear`]: linear layers whose weights a serving model packs once, in f32 or bf16, for the
//!   AVX-512 kernel ([`pack_linear_layers`], [`LinearLayers`], [`packed_matmul`]); in training the
//!   same engine runs the forward and backward products (`rankstack_kernels::cpu::linear`).
//! - [`row_sparse`]: row-sparse gradients for embedding tables ([`RowGather`], [`RowGradient`]).
//! - [`device_memory`]: a device's capacity and the peak memory its tensors used (CUDA and CPU).
//! - [`recompute`]: a part of the graph recomputed in the backward pass instead of keeping its
//!   intermediates (activation checkpointing; the composed attention uses it).
//! - [`probe`]: marks between the parts of a forward pass, and [`probe::record_parts`], the time
//!   each part takes on its device; [`on_worker_pool`] carries a recording over to the CPU pool.
//! - [`host_transfer`] (from `rankstack_kernels`): every copy of tensor values between the host and
//!   a device, through one place, so that a test can list a step's transfers.
//! - `testing` (feature `testing`, for tests and benchmarks): fixture loading and closeness
//!   checks for the PyTorch reference tests.
//!
//! Every layer constructor in the workspace takes a config and a [`candle_nn::VarBuilder`], returns
//! [`Result`] (invalid configs fail there), and implements [`candle_core::Module`] (or
//! [`candle_core::ModuleT`] when it behaves differently in training).

#![forbid(unsafe_code)]

pub mod activation;
pub mod batch_norm;
pub mod checkpoint;
pub mod device_memory;
pub mod dropout;
pub mod error;
pub mod finite;
pub mod init;
pub mod init_scheme;
pub mod layer_checkpoint;
pub mod layer_norm;
pub mod linear;
pub mod loss;
pub mod mlp;
pub mod probe;
pub mod recompute;
pub mod reseed;
mod residual_norm;
pub mod rng;
pub mod row_sparse;
pub mod shape;
pub mod softmax;
mod standardize;
pub mod state_dict;
pub mod tensor_write;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod worker_pool;

/// Weights packed once for the CPU serving kernel (re-exported from `rankstack-kernels`).
pub use rankstack_kernels::cpu::packed_matmul;
pub use rankstack_kernels::cpu::WeightPrecision;
pub use rankstack_kernels::host_transfer;

pub use activation::Activation;
pub use batch_norm::{BatchNorm, BatchNormConfig};
pub use dropout::Dropout;
pub use error::{Error, Result};
pub use init::SeededVarMap;
pub use init_scheme::InitScheme;
pub use layer_norm::{LayerNorm, LayerNormConfig};
pub use linear::{autocast_linear_layers, linear_xavier, pack_linear_layers, Linear, LinearLayers};
pub use mlp::{Mlp, MlpConfig, Normalization};
pub use reseed::Reseed;
pub use row_sparse::{RowGather, RowGradient};
pub use softmax::softmax;
pub use worker_pool::{on_worker_pool, on_worker_pool_for, on_worker_pool_for_rows};
