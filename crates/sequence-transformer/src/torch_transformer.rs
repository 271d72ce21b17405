//! Importing a `torch.nn.TransformerEncoder` (ReLU feed-forward, `batch_first=True`, no final
//! `norm`): its parameter names are rankstack's, so the import checks every tensor's presence,
//! shape, dtype and values against the config and hands them on unchanged.

use std::collections::HashMap;

use candle_core::Tensor;
use rankstack_nn::state_dict::StateDictImport;
use rankstack_nn::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::EncoderLayerConfig;

/// A `torch.nn.TransformerEncoder` of `num_layers` copies of
/// `nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, layer_norm_eps,
/// batch_first=True, norm_first)`, under PyTorch's argument names; builds a
/// [`crate::TransformerEncoder`] of width `d_model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorchTransformerConfig {
    /// Model width.
    pub d_model: usize,
    /// Attention heads; must divide `d_model`.
    pub nhead: usize,
    /// Feed-forward width.
    pub dim_feedforward: usize,
    /// Number of layers.
    pub num_layers: usize,
    /// Dropout probability, training only (PyTorch's default 0.1).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Pre-norm instead of post-norm (PyTorch's default `false`).
    #[serde(default)]
    pub norm_first: bool,
    /// LayerNorm epsilon (PyTorch's default 1e-5).
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Seed of the dropout streams.
    #[serde(default)]
    pub seed: u64,
}

fn default_dropout() -> f64 {
    0.1
}

fn default_eps() -> f64 {
    1e-5
}

impl TorchTransformerConfig {
    /// The options of each [`crate::TransformerEncoderLayer`].
    pub fn layer_config(&self) -> EncoderLayerConfig {
        EncoderLayerConfig {
            num_heads: self.nhead,
            ff_dim: self.dim_feedforward,
            dropout: self.dropout,
            norm_first: self.norm_first,
            layer_norm_eps: self.layer_norm_eps,
            seed: self.seed,
        }
    }
}

/// The tensors of one `nn.TransformerEncoderLayer` of width `d` and feed-forward width `ff`, by
/// their names under the layer, with their shapes (shared by the TransAct importer).
pub(crate) fn encoder_layer_tensors(d: usize, ff: usize) -> [(&'static str, Vec<usize>); 12] {
    [
        ("self_attn.in_proj_weight", vec![3 * d, d]),
        ("self_attn.in_proj_bias", vec![3 * d]),
        ("self_attn.out_proj.weight", vec![d, d]),
        ("self_attn.out_proj.bias", vec![d]),
        ("linear1.weight", vec![ff, d]),
        ("linear1.bias", vec![ff]),
        ("linear2.weight", vec![d, ff]),
        ("linear2.bias", vec![d]),
        ("norm1.weight", vec![d]),
        ("norm1.bias", vec![d]),
        ("norm2.weight", vec![d]),
        ("norm2.bias", vec![d]),
    ]
}

/// Renames every encoder layer's tensors from `{from}layers.{i}.…` to `{to}layers.{i}.…`.
pub(crate) fn import_encoder_layers(
    import: &mut StateDictImport,
    from: &str,
    to: &str,
    num_layers: usize,
    d: usize,
    ff: usize,
) {
    for i in 0..num_layers {
        for (name, shape) in encoder_layer_tensors(d, ff) {
            import.rename(&format!("{from}layers.{i}.{name}"), &shape, format!("{to}layers.{i}.{name}"));
        }
    }
}

/// The tensors of the [`crate::TransformerEncoder`] `config` describes, from a
/// `torch.nn.TransformerEncoder` state dict (same names). Every tensor is checked; a missing,
/// unexpected (e.g. a final `norm.*`), mis-shaped, integer or non-finite one is reported, all at
/// once.
pub fn from_torch_transformer_state_dict(
    config: &TorchTransformerConfig,
    state: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    const LAYER: &str = "nn.TransformerEncoder import";
    for (field, value) in [("d_model", config.d_model), ("nhead", config.nhead), ("num_layers", config.num_layers)] {
        if value == 0 {
            return Err(Error::config(LAYER, field, "must be > 0"));
        }
    }
    let mut import = StateDictImport::new("nn.TransformerEncoder", state);
    import_encoder_layers(&mut import, "", "", config.num_layers, config.d_model, config.dim_feedforward);
    import.finish()
}
