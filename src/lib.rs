//! rankstack: composable, reference-checked layers for feed-ranking models, on candle.
//!
//! This crate re-exports the layer crates so that an application can depend on one crate:
//!
//! | module | crate | what |
//! |---|---|---|
//! | [`kernels`] | `rankstack-kernels` | the compute kernels (packed GEMM, fused CPU ops, CUDA helpers); the only `unsafe` |
//! | [`nn`] | `rankstack-nn` | shared blocks: grad-safe LayerNorm, stable BCE, MLP, init, errors |
//! | [`dcnv2`] | `dcnv2` | DCN-V2 cross networks (full rank, low rank, mixture; stacked, parallel) |
//! | [`masknet`] | `masknet` | MaskNet blocks, parallel and serial |
//! | [`feature_encoders`] | `feature-encoders` | dense, sparse and embedding feature encoders |
//! | [`sequence_transformer`] | `sequence-transformer` | TransAct user-sequence encoder |
//! | [`ranker_model`] | `ranker-model` | the whole ranker: config, presets, checkpoints, cost planner |
//! | [`data`] | (this crate) | training data: Parquet I/O, the synthetic data set, MovieLens-100k |
//! | [`serve`] | (this crate) | `rankstack serve`: the Open Inference Protocol server with dynamic batching |
//! | [`metrics`] | (this crate) | evaluation metrics for binary tasks: AUC, log loss, normalised entropy, calibration |
//! | [`cpu_threads`] | (this crate) | candle's element-wise pool kept to the calling thread (binaries and benchmarks); opt-in worker pinning for `serve` |
//! | [`memory`] | (this crate) | the allocator setting binaries and benchmarks apply at start-up |
//!
//! Each layer crate can also be used alone. See `docs/ARCHITECTURE.md` for where things live.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use rankstack::dcnv2::{CrossNet, CrossNetConfig};
//! use rankstack::masknet::{ParallelMaskNet, ParallelMaskNetConfig};
//! use rankstack::nn::SeededVarMap;
//!
//! // The paper's interaction stack: parallel MaskNet (3 x 512), then 4 full-rank DCNv2 layers.
//! let params = SeededVarMap::new(0);
//! let vb = params.var_builder(DType::F32, &Device::Cpu);
//! let masknet = ParallelMaskNet::new(64, &ParallelMaskNetConfig::paper(), vb.pp("masknet"))?;
//! let cross = CrossNet::new(masknet.output_dim(), &CrossNetConfig::full_rank(4), vb.pp("crossnet"))?;
//! let y = cross.forward(&masknet.forward(&Tensor::zeros((2, 64), DType::F32, &Device::Cpu)?)?)?;
//! assert_eq!(y.dims(), &[2, 1536]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod commands;
pub mod cpu_threads;
pub mod data;
pub mod device;
pub mod metrics;
pub mod serve;
pub mod train;

/// The allocator setting that keeps freed tensor memory for reuse (binaries and benchmarks call
/// [`memory::retain_freed_memory`] once at start-up; libraries leave it to the application).
pub use rankstack_kernels::cpu::allocator as memory;

pub use dcnv2;
pub use feature_encoders;
pub use masknet;
pub use ranker_model;
pub use rankstack_kernels as kernels;
pub use rankstack_nn as nn;
pub use sequence_transformer;
