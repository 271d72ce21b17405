//! Importing a `torch.nn.TransformerEncoder` (`batch_first=True`; ReLU or GELU, with or without
//! biases, with or without a final `norm`): its parameter names are rankstack's, so the import
//! checks every tensor's presence, shape, dtype and values against the config and hands them on
//! unchanged.

use std::collections::HashMap;

use candle_core::Tensor;
use rankstack_nn::state_dict::StateDictImport;
use rankstack_nn::{Activation, Error, Result};
use serde::{Deserialize, Serialize};

use crate::EncoderLayerConfig;

/// A `torch.nn.TransformerEncoder` of `num_layers` copies of
/// `nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
/// layer_norm_eps, batch_first=True, norm_first, bias)` with an optional final LayerNorm (`norm`),
/// under PyTorch's argument names; builds a [`crate::TransformerEncoder`] of width `d_model`.
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
    /// Feed-forward activation: `relu` (PyTorch's default) or `gelu`.
    #[serde(default)]
    pub activation: Activation,
    /// Biases on every projection and LayerNorm (PyTorch's default `true`).
    #[serde(default = "default_bias")]
    pub bias: bool,
    /// A final LayerNorm after the last layer (`nn.TransformerEncoder(…, norm=LayerNorm(d_model))`),
    /// tensors `norm.*`.
    #[serde(default)]
    pub final_norm: bool,
    /// Seed of the dropout streams.
    #[serde(default)]
    pub seed: u64,
}

fn default_bias() -> bool {
    true
}

fn default_dropout() -> f64 {
    0.1
}

fn default_eps() -> f64 {
    1e-5
}

impl TorchTransformerConfig {
    /// The [`crate::TransformerEncoder`] this config describes (with its final norm if any).
    pub fn build(&self, vb: candle_nn::VarBuilder) -> Result<crate::TransformerEncoder> {
        crate::TransformerEncoder::with_final_norm(
            self.d_model,
            self.num_layers,
            &self.layer_config(),
            self.final_norm,
            vb,
        )
    }

    /// The options of each [`crate::TransformerEncoderLayer`].
    pub fn layer_config(&self) -> EncoderLayerConfig {
        EncoderLayerConfig {
            num_heads: self.nhead,
            ff_dim: self.dim_feedforward,
            dropout: self.dropout,
            norm_first: self.norm_first,
            layer_norm_eps: self.layer_norm_eps,
            seed: self.seed,
            activation: self.activation,
            bias: self.bias,
        }
    }
}

/// The tensors of one `nn.TransformerEncoderLayer` of width `d` and feed-forward width `ff`, by
/// their names under the layer, with their shapes; without `bias`, the weights only.
fn encoder_layer_tensors(d: usize, ff: usize, bias: bool) -> Vec<(&'static str, Vec<usize>)> {
    let all = [
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
    ];
    all.into_iter().filter(|(name, _)| bias || !name.ends_with("bias")).collect()
}

/// The layout of an encoder's tensors: what [`import_encoder`] expects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EncoderShape {
    pub d: usize,
    pub ff: usize,
    pub num_layers: usize,
    pub bias: bool,
    pub final_norm: bool,
}

/// Renames an encoder's tensors from `{from}layers.{i}.…` (and `{from}norm.*`) to `{to}…`.
pub(crate) fn import_encoder(import: &mut StateDictImport, from: &str, to: &str, shape: EncoderShape) {
    for i in 0..shape.num_layers {
        for (name, dims) in encoder_layer_tensors(shape.d, shape.ff, shape.bias) {
            import.rename(&format!("{from}layers.{i}.{name}"), &dims, format!("{to}layers.{i}.{name}"));
        }
    }
    if shape.final_norm {
        import.rename(&format!("{from}norm.weight"), &[shape.d], format!("{to}norm.weight"));
        if shape.bias {
            import.rename(&format!("{from}norm.bias"), &[shape.d], format!("{to}norm.bias"));
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
    let shape = EncoderShape {
        d: config.d_model,
        ff: config.dim_feedforward,
        num_layers: config.num_layers,
        bias: config.bias,
        final_norm: config.final_norm,
    };
    import_encoder(&mut import, "", "", shape);
    import.finish()
}
