//! DCN-V2 cross networks (Wang et al. 2020, "DCN V2: Improved Deep & Cross Network").
//!
//! A cross layer multiplies the original input `x0` element-wise with a learned linear map of the
//! current state, adding explicit feature interactions of one order higher per layer:
//!
//! | variant | formula (`x0` first input, `x` this layer's input, `s` = `diag_scale`) | parameters |
//! |---|---|---|
//! | full rank | `x' = x0 ⊙ (W x + b + s·x) + x` | `weight` `[d, d]`, `bias` `[d]` |
//! | low rank | `x' = x0 ⊙ (U (V x) + b + s·x) + x` | `v.weight` `[r, d]`, `u.weight` `[d, r]`, `bias` |
//! | mixture | `x' = Σᵢ gᵢ(x) · x0 ⊙ (Uᵢ φ(Cᵢ φ(Vᵢ x)) + b + s·x) + x`, `g = softmax(Gᵢ x)` | `experts.{i}.{v,c,u}.weight` (`[r, d]`, `[r, r]`, `[d, r]`), `gates.{i}.weight` `[1, d]`, `bias` |
//! | vector (DCN-V1) | `x' = x0 (xᵀw) + b + x` | `weight` `[1, d]`, `bias` `[d]` |
//!
//! Mixture gates are per layer (`layers.{l}.gates.{i}.weight`) by default, or shared by the whole
//! stack (`gates.{i}.weight`, torchrec's `LowRankMixtureCrossNet`) with `shared_gates`.
//!
//! Weights use PyTorch's `Linear` layout (`[out, in]`), so a PyTorch state dict with the same names
//! loads directly. [`CrossNet`] stacks layers (`layers.{l}.…`); [`ParallelCrossNet`] runs several
//! independent stacks on the same input (`towers.{p}.layers.{l}.…`) and concatenates or averages them.
//!
//! torchrec's cross networks (`CrossNet`, `VectorCrossNet`, `LowRankCrossNet`,
//! `LowRankMixtureCrossNet`) import with [`from_torchrec_state_dict`]; [`save_cross_net`] and
//! [`load_cross_net`] keep a [`CrossNet`] as a single-layer checkpoint (`docs/compatibility.md`).
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use dcnv2::{CrossNet, CrossNetConfig};
//! use rankstack_nn::SeededVarMap;
//!
//! let params = SeededVarMap::new(42);
//! let cross = CrossNet::new(16, &CrossNetConfig::full_rank(4), params.var_builder(DType::F32, &Device::Cpu))?;
//! let x = Tensor::randn(0f32, 1.0, (8, 16), &Device::Cpu)?;
//! assert_eq!(cross.forward(&x)?.dims(), &[8, 16]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod checkpoint;
mod config;
mod cross_layer;
mod cross_net;
mod parallel;
mod torchrec;

pub use checkpoint::{cross_net_spec, load_cross_net, save_cross_net, CROSS_NET_LAYER};
pub use config::{Combine, CrossLayerKind, CrossNetConfig, ParallelCrossNetConfig};
pub use cross_layer::CrossLayer;
pub use cross_net::CrossNet;
pub use parallel::ParallelCrossNet;
pub use torchrec::{from_torchrec_state_dict, torchrec_class};
