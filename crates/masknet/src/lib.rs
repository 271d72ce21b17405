//! MaskNet (Wang et al. 2021, "MaskNet: Introducing Feature-Wise Multiplication to CTR Ranking
//! Models by Instance-Guided Mask").
//!
//! A [`MaskBlock`] multiplies a hidden representation element-wise by a mask computed from the
//! feature embedding, then projects, normalises and activates:
//!
//! ```text
//! mask = W2 · ReLU(W1 · v_emb + b1) + b2      W1: t×m ("aggregation"), W2: z×t ("projection")
//! out  = act(LN(W_h · (mask ⊙ h)))            W_h: q×z, bias optional (off by default)
//! ```
//!
//! with `t = round(projection_ratio · m)` (or truncated, as Twitter's recap code does:
//! [`AggregationRounding`]) unless `aggregation_dim` is given, an optional LayerNorm on
//! `h` before masking, and dropout on the output in training only. [`ParallelMaskNet`] runs `u`
//! blocks on the same embedding and concatenates them (the Pinterest configuration: 3 blocks,
//! ratio 2.0, 512 outputs each, [`ParallelMaskNetConfig::paper`]; or one config per block,
//! `blocks`); [`SerialMaskNet`] chains them,
//! each block masking the previous block's output with a mask generated from the embedding.
//!
//! Twitter's recap MaskNet imports with [`from_twitter_state_dict`]; [`save_masknet`],
//! [`load_parallel_masknet`] and [`load_serial_masknet`] keep a MaskNet as a single-layer
//! checkpoint (`docs/compatibility.md`).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use masknet::{ParallelMaskNet, ParallelMaskNetConfig};
//! use rankstack_nn::SeededVarMap;
//!
//! let params = SeededVarMap::new(7);
//! let masknet = ParallelMaskNet::new(64, &ParallelMaskNetConfig::paper(), params.var_builder(DType::F32, &Device::Cpu))?;
//! let y = masknet.forward(&Tensor::zeros((4, 64), DType::F32, &Device::Cpu)?)?;
//! assert_eq!(y.dims(), &[4, 3 * 512]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod checkpoint;
mod config;
mod mask_block;
mod parallel;
mod serial;
mod twitter;

pub use checkpoint::{
    load_parallel_masknet, load_serial_masknet, save_masknet, PARALLEL_MASKNET_LAYER, SERIAL_MASKNET_LAYER,
};
pub use config::{AggregationRounding, MaskBlockConfig, ParallelMaskNetConfig, SerialMaskNetConfig};
pub use mask_block::MaskBlock;
pub use parallel::ParallelMaskNet;
pub use serial::SerialMaskNet;
pub use twitter::{from_twitter_state_dict, MaskNetConfig};
