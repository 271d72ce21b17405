//! Configuration of the cross networks.

use rankstack_nn::{Activation, Error, Result};
use serde::{Deserialize, Serialize};

/// Which cross layer to stack. Serialised with a `type` tag:
/// `{"type": "full_rank"}`, `{"type": "low_rank", "rank": 64}`,
/// `{"type": "mixture", "rank": 64, "num_experts": 4, "activation": "relu"}`, `{"type": "vector"}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CrossLayerKind {
    /// `W` is a full `d × d` matrix (the paper's production choice).
    FullRank,
    /// `W ≈ U V` with rank `rank`.
    LowRank {
        /// `r ≥ 1`.
        rank: usize,
    },
    /// A softmax-gated mixture of low-rank experts with a non-linearity in the `r`-dimensional space.
    Mixture {
        /// `r ≥ 1`.
        rank: usize,
        /// Number of experts `≥ 1`; with one, the gate is skipped.
        num_experts: usize,
        /// `φ`; ReLU by default (torchrec), tanh as in FuxiCTR.
        #[serde(default)]
        activation: Activation,
        /// One set of gates `gates.{i}.weight` for the whole stack (torchrec's
        /// `LowRankMixtureCrossNet`) instead of one set per layer (`layers.{l}.gates.{i}.weight`).
        #[serde(default)]
        shared_gates: bool,
    },
    /// DCN-V1's vector cross layer (torchrec's `VectorCrossNet`): `x' = x0 (xᵀw) + b + x`, one
    /// weight vector `w` (`weight` `[1, d]`) per layer; the bias is added outside the product with
    /// `x0`. `diag_scale` is not defined for it.
    Vector,
}

/// A stack of cross layers of one kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossNetConfig {
    /// Number of stacked layers `L ≥ 1`, each with its own weights.
    pub num_layers: usize,
    /// The layer variant.
    pub layer: CrossLayerKind,
    /// `s ≥ 0` in `x0 ⊙ (… + s·x)`; 0 (off) by default, as TF Recommenders' `diag_scale`.
    #[serde(default)]
    pub diag_scale: f64,
}

impl CrossNetConfig {
    /// `num_layers` full-rank layers (the paper: 4).
    pub fn full_rank(num_layers: usize) -> Self {
        Self { num_layers, layer: CrossLayerKind::FullRank, diag_scale: 0.0 }
    }

    /// `num_layers` low-rank layers of rank `rank`.
    pub fn low_rank(num_layers: usize, rank: usize) -> Self {
        Self { num_layers, layer: CrossLayerKind::LowRank { rank }, diag_scale: 0.0 }
    }

    /// `num_layers` DCN-V1 vector layers.
    pub fn vector(num_layers: usize) -> Self {
        Self { num_layers, layer: CrossLayerKind::Vector, diag_scale: 0.0 }
    }

    /// `num_layers` mixture layers with `num_experts` ReLU experts of rank `rank`.
    pub fn mixture(num_layers: usize, rank: usize, num_experts: usize) -> Self {
        Self {
            num_layers,
            layer: CrossLayerKind::Mixture { rank, num_experts, activation: Activation::Relu, shared_gates: false },
            diag_scale: 0.0,
        }
    }

    /// Checks every field; errors name `layer` and the field (prefixed by `prefix`, e.g. `tower.`).
    pub(crate) fn validate(&self, layer: &str, prefix: &str, input_dim: usize) -> Result<()> {
        let field = |f: &str| format!("{prefix}{f}");
        if input_dim == 0 {
            return Err(Error::config(layer, "input_dim", "must be > 0"));
        }
        if self.num_layers == 0 {
            return Err(Error::config(layer, field("num_layers"), "must be > 0"));
        }
        if !(self.diag_scale.is_finite() && self.diag_scale >= 0.0) {
            return Err(Error::config(
                layer,
                field("diag_scale"),
                format!("must be finite and >= 0, got {}", self.diag_scale),
            ));
        }
        match self.layer {
            CrossLayerKind::FullRank => {}
            CrossLayerKind::Vector if self.diag_scale != 0.0 => {
                return Err(Error::config(
                    layer,
                    field("diag_scale"),
                    "is not defined for the vector cross layer (DCN-V1); leave it at 0",
                ));
            }
            CrossLayerKind::LowRank { rank } | CrossLayerKind::Mixture { rank, .. } if rank == 0 => {
                return Err(Error::config(layer, field("layer.rank"), "must be >= 1"));
            }
            CrossLayerKind::Mixture { num_experts: 0, .. } => {
                return Err(Error::config(layer, field("layer.num_experts"), "must be >= 1"));
            }
            _ => {}
        }
        Ok(())
    }
}

/// How [`crate::ParallelCrossNet`] combines its towers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// Concatenate the tower outputs: width `P · d`.
    #[default]
    Concat,
    /// Average the tower outputs: width `d`.
    Mean,
}

/// `P` independent cross stacks on the same input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelCrossNetConfig {
    /// Number of towers `P ≥ 1`.
    pub num_towers: usize,
    /// Each tower's configuration.
    pub tower: CrossNetConfig,
    /// How the towers are combined.
    #[serde(default)]
    pub combine: Combine,
}
