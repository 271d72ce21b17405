//! Configuration of MaskNet blocks and networks.

use rankstack_nn::{Activation, Error, MlpConfig, Result};
use serde::{Deserialize, Serialize};

/// One [`crate::MaskBlock`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskBlockConfig {
    /// Output width `q`.
    pub output_dim: usize,
    /// `t = round(projection_ratio · m)` (halves round away from zero); ignored when
    /// `aggregation_dim` is set. Default 2.0, the paper's value.
    #[serde(default = "default_ratio")]
    pub projection_ratio: f64,
    /// Explicit aggregation width `t`, overriding the ratio.
    #[serde(default)]
    pub aggregation_dim: Option<usize>,
    /// Bias on the hidden projection `W_h`. Off by default (FuxiCTR, Pinterest); on in Twitter's code.
    #[serde(default)]
    pub hidden_bias: bool,
    /// Activation after the output LayerNorm: ReLU (the paper) or `identity` (Twitter's recap code).
    #[serde(default)]
    pub activation: Activation,
    /// LayerNorm on the hidden input `h` before masking.
    #[serde(default)]
    pub input_layer_norm: bool,
    /// Dropout probability on the block output, in training only.
    #[serde(default)]
    pub dropout: f64,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_ratio() -> f64 {
    2.0
}

fn default_eps() -> f64 {
    1e-5
}

impl MaskBlockConfig {
    /// A block with `output_dim` outputs and every other option at its default.
    pub fn new(output_dim: usize) -> Self {
        Self {
            output_dim,
            projection_ratio: default_ratio(),
            aggregation_dim: None,
            hidden_bias: false,
            activation: Activation::Relu,
            input_layer_norm: false,
            dropout: 0.0,
            layer_norm_eps: default_eps(),
        }
    }

    /// The aggregation width `t` for a mask input of width `m`, after validating the config.
    pub fn aggregation_width(&self, layer: &str, prefix: &str, mask_input_dim: usize) -> Result<usize> {
        let field = |f: &str| format!("{prefix}{f}");
        if mask_input_dim == 0 {
            return Err(Error::config(layer, "input_dim", "must be > 0"));
        }
        if self.output_dim == 0 {
            return Err(Error::config(layer, field("output_dim"), "must be > 0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(layer, field("dropout"), format!("must be in [0, 1), got {}", self.dropout)));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::config(
                layer,
                field("layer_norm_eps"),
                format!("must be finite and > 0, got {}", self.layer_norm_eps),
            ));
        }
        match self.aggregation_dim {
            Some(0) => Err(Error::config(layer, field("aggregation_dim"), "must be > 0")),
            Some(t) => Ok(t),
            None => {
                let r = self.projection_ratio;
                if !(r.is_finite() && r > 0.0) {
                    return Err(Error::config(
                        layer,
                        field("projection_ratio"),
                        format!("must be finite and > 0, got {r}"),
                    ));
                }
                let t = (r * mask_input_dim as f64).round();
                if t < 1.0 {
                    return Err(Error::config(
                        layer,
                        field("projection_ratio"),
                        format!("{r} x input width {mask_input_dim} rounds to an aggregation width of 0"),
                    ));
                }
                Ok(t as usize)
            }
        }
    }
}

/// `num_blocks` MaskBlocks on the same input, concatenated, with an optional MLP on top.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelMaskNetConfig {
    /// Number of blocks `u ≥ 1`.
    pub num_blocks: usize,
    /// Every block's configuration.
    pub block: MaskBlockConfig,
    /// Optional MLP applied to the concatenated block outputs.
    #[serde(default)]
    pub top_mlp: Option<MlpConfig>,
}

impl ParallelMaskNetConfig {
    /// The paper's configuration: 3 blocks, projection ratio 2.0, 512 outputs each, no top MLP.
    pub fn paper() -> Self {
        Self { num_blocks: 3, block: MaskBlockConfig::new(512), top_mlp: None }
    }
}

/// MaskBlocks in series: block 1 masks the embedding, block k masks block k−1's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialMaskNetConfig {
    /// The blocks in order (each with its own output width).
    pub blocks: Vec<MaskBlockConfig>,
}
