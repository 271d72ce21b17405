//! Importing torchrec's cross networks (`torchrec.modules.crossnet`): their state dicts renamed,
//! reshaped and split into this crate's parameter names.
//!
//! | torchrec | its tensors (`l` layer, `K` experts) | rankstack (`layers.{l}.…`) |
//! |---|---|---|
//! | `CrossNet` | `kernels.{l}` `[N, N]`, `bias.{l}` `[N, 1]` | `weight`, `bias` `[N]` (`full_rank`) |
//! | `VectorCrossNet` | `kernels.{l}` `[N, 1]`, `bias.{l}` `[N, 1]` | `weight` `[1, N]`, `bias` `[N]` (`vector`) |
//! | `LowRankCrossNet` | `W_kernels.{l}` `[N, r]`, `V_kernels.{l}` `[r, N]`, `bias.{l}` `[N]` | `u.weight`, `v.weight`, `bias` (`low_rank`) |
//! | `LowRankMixtureCrossNet` | `U_kernels.{l}` `[K, N, r]`, `V_kernels.{l}` `[K, r, N]`, `C_kernels.{l}` `[K, r, r]`, `bias.{l}` `[N, 1]`, `gates.{k}.weight` `[1, N]` (K > 1) | `experts.{k}.{u,v,c}.weight`, `bias`; `gates.{k}.weight` at the top (`mixture` with `shared_gates: true`) |

use std::collections::HashMap;

use candle_core::Tensor;
use rankstack_nn::state_dict::StateDictImport;
use rankstack_nn::{Error, Result};

use crate::{CrossLayerKind, CrossNetConfig};

const LAYER: &str = "torchrec import";

/// The torchrec class whose state dict a [`CrossNetConfig`] can take: `CrossNet` (full rank),
/// `VectorCrossNet`, `LowRankCrossNet`, `LowRankMixtureCrossNet`.
pub fn torchrec_class(config: &CrossNetConfig) -> &'static str {
    match config.layer {
        CrossLayerKind::FullRank => "CrossNet",
        CrossLayerKind::Vector => "VectorCrossNet",
        CrossLayerKind::LowRank { .. } => "LowRankCrossNet",
        CrossLayerKind::Mixture { .. } => "LowRankMixtureCrossNet",
    }
}

/// The tensors of a [`crate::CrossNet`] on `input_dim` features with `config`, from the state dict
/// of the torchrec module that `config` reproduces ([`torchrec_class`]; see the module docs for the
/// mapping). Every torchrec tensor is checked: a missing, unexpected, mis-shaped, integer or
/// non-finite one is reported, all at once, under its torchrec name. Configs torchrec has no
/// counterpart for are refused: `diag_scale ≠ 0`, and a mixture of several experts with per-layer
/// gates (torchrec shares one set of gates across the layers: set `shared_gates: true`).
pub fn from_torchrec_state_dict(
    input_dim: usize,
    config: &CrossNetConfig,
    state: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    config.validate(LAYER, "", input_dim)?;
    if config.diag_scale != 0.0 {
        return Err(Error::config(LAYER, "diag_scale", "torchrec's cross networks have none; set it to 0"));
    }
    let n = input_dim;
    let mut import = StateDictImport::new(format!("torchrec {}", torchrec_class(config)), state);
    for l in 0..config.num_layers {
        let to = |name: &str| format!("layers.{l}.{name}");
        match config.layer {
            CrossLayerKind::FullRank => {
                import.rename(&format!("kernels.{l}"), &[n, n], to("weight"));
                import.reshape(&format!("bias.{l}"), &[n, 1], to("bias"), &[n]);
            }
            CrossLayerKind::Vector => {
                import.reshape(&format!("kernels.{l}"), &[n, 1], to("weight"), &[1, n]);
                import.reshape(&format!("bias.{l}"), &[n, 1], to("bias"), &[n]);
            }
            CrossLayerKind::LowRank { rank: r } => {
                import.rename(&format!("W_kernels.{l}"), &[n, r], to("u.weight"));
                import.rename(&format!("V_kernels.{l}"), &[r, n], to("v.weight"));
                import.rename(&format!("bias.{l}"), &[n], to("bias"));
            }
            CrossLayerKind::Mixture { rank: r, num_experts: k, shared_gates, .. } => {
                if k > 1 && !shared_gates {
                    return Err(Error::config(
                        LAYER,
                        "layer.shared_gates",
                        "torchrec's LowRankMixtureCrossNet shares its gates across layers; set it to true",
                    ));
                }
                for (peer, ours, shape) in [("U", "u", [k, n, r]), ("V", "v", [k, r, n]), ("C", "c", [k, r, r])] {
                    import.split(&format!("{peer}_kernels.{l}"), &shape, |e| to(&format!("experts.{e}.{ours}.weight")));
                }
                import.reshape(&format!("bias.{l}"), &[n, 1], to("bias"), &[n]);
            }
        }
    }
    if let CrossLayerKind::Mixture { num_experts: k, .. } = config.layer {
        if k > 1 {
            for e in 0..k {
                import.rename(&format!("gates.{e}.weight"), &[1, n], format!("gates.{e}.weight"));
            }
        }
    }
    import.finish()
}
