//! Configuration of MaskNet blocks and networks.

use rankstack_nn::{Activation, Error, MlpConfig, Result};
use serde::{Deserialize, Serialize};

/// How `projection_ratio · m` becomes the integer aggregation width `t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregationRounding {
    /// To the nearest integer, halves away from zero (rf 1.25 on width 10: 13).
    #[default]
    Round,
    /// Towards zero, as Twitter's recap MaskNet does (`int(reduction_factor * input_dim)`; rf 1.25
    /// on width 10: 12).
    Truncate,
}

/// One [`crate::MaskBlock`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskBlockConfig {
    /// Output width `q`.
    pub output_dim: usize,
    /// `t = round(projection_ratio · m)` (halves round away from zero; or truncated, see
    /// `aggregation_rounding`); ignored when `aggregation_dim` is set. Default 2.0, the paper's
    /// value.
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
    /// How the ratio's product becomes an integer width.
    #[serde(default)]
    pub aggregation_rounding: AggregationRounding,
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
            aggregation_rounding: AggregationRounding::Round,
        }
    }

    /// `projection_ratio · m` made an integer as `aggregation_rounding` says (unvalidated: see
    /// [`MaskBlockConfig::aggregation_width`]), or `aggregation_dim` when given.
    pub fn aggregation_width_unchecked(&self, mask_input_dim: usize) -> usize {
        if let Some(t) = self.aggregation_dim {
            return t;
        }
        let product = self.projection_ratio * mask_input_dim as f64;
        let t = match self.aggregation_rounding {
            AggregationRounding::Round => product.round(),
            AggregationRounding::Truncate => product.trunc(),
        };
        t as usize
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
                let t = self.aggregation_width_unchecked(mask_input_dim);
                if t < 1 {
                    let verb = match self.aggregation_rounding {
                        AggregationRounding::Round => "rounds",
                        AggregationRounding::Truncate => "truncates",
                    };
                    return Err(Error::config(
                        layer,
                        field("projection_ratio"),
                        format!("{r} x input width {mask_input_dim} {verb} to an aggregation width of 0"),
                    ));
                }
                Ok(t)
            }
        }
    }
}

/// MaskBlocks on the same input, concatenated, with an optional MLP on top: `num_blocks` copies
/// of one `block` config, or one config per block in `blocks` (Twitter's recap MaskNet lists its
/// `mask_blocks` this way; each may differ in width, ratio, rounding, norms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelMaskNetConfig {
    /// Number of blocks `u ≥ 1` sharing `block`; with `blocks`, 0 (or left out) or `blocks.len()`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_blocks: usize,
    /// Every block's configuration; left out when `blocks` is given.
    #[serde(default = "unset_block", skip_serializing_if = "is_unset_block")]
    pub block: MaskBlockConfig,
    /// One configuration per block (instead of `num_blocks` × `block`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<MaskBlockConfig>,
    /// Optional MLP applied to the concatenated block outputs.
    #[serde(default)]
    pub top_mlp: Option<MlpConfig>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The stand-in for a `block` left out (a width of 0 is never valid).
fn unset_block() -> MaskBlockConfig {
    MaskBlockConfig::new(0)
}

fn is_unset_block(block: &MaskBlockConfig) -> bool {
    *block == unset_block()
}

impl ParallelMaskNetConfig {
    /// The paper's configuration: 3 blocks, projection ratio 2.0, 512 outputs each, no top MLP.
    pub fn paper() -> Self {
        Self { num_blocks: 3, block: MaskBlockConfig::new(512), blocks: Vec::new(), top_mlp: None }
    }

    /// One config per block, each with the field prefix its errors use (`block.` or
    /// `blocks.{i}.`); errors name `layer` and say which of `num_blocks`/`block`/`blocks` is wrong.
    pub fn block_configs(&self, layer: &str) -> Result<Vec<(MaskBlockConfig, String)>> {
        if self.blocks.is_empty() {
            if self.num_blocks == 0 {
                return Err(Error::config(layer, "num_blocks", "must be > 0 (or list the blocks in `blocks`)"));
            }
            return Ok(vec![(self.block.clone(), "block.".to_string()); self.num_blocks]);
        }
        if self.num_blocks != 0 && self.num_blocks != self.blocks.len() {
            return Err(Error::config(
                layer,
                "num_blocks",
                format!("is {} but `blocks` lists {} blocks", self.num_blocks, self.blocks.len()),
            ));
        }
        if !is_unset_block(&self.block) {
            return Err(Error::config(
                layer,
                "block",
                "is given together with `blocks`: give one config for all blocks (`num_blocks` + `block`) or one per block (`blocks`)",
            ));
        }
        Ok(self.blocks.iter().enumerate().map(|(i, b)| (b.clone(), format!("blocks.{i}."))).collect())
    }

    /// The concatenated width of the block outputs (before any top MLP); 0 for an invalid config.
    pub fn concat_dim(&self) -> usize {
        self.block_configs("").map(|blocks| blocks.iter().map(|(b, _)| b.output_dim).sum()).unwrap_or(0)
    }
}

/// MaskBlocks in series: block 1 masks the embedding, block k masks block k−1's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialMaskNetConfig {
    /// The blocks in order (each with its own output width).
    pub blocks: Vec<MaskBlockConfig>,
}
