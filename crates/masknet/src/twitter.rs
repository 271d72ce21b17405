//! Importing Twitter's MaskNet (the-algorithm-ml, `projects/home/recap/model/mask_net.py`): its
//! state dict renamed into [`crate::ParallelMaskNet`] or [`crate::SerialMaskNet`] parameters.
//!
//! | Twitter (block `i`) | rankstack (`blocks.{i}.…`) |
//! |---|---|
//! | `_mask_blocks.{i}._mask_layer.0.{weight,bias}` `[t, m]`, `[t]` | `mask.aggregation.{weight,bias}` |
//! | `_mask_blocks.{i}._mask_layer.2.{weight,bias}` `[z, t]`, `[z]` | `mask.projection.{weight,bias}` |
//! | `_mask_blocks.{i}._hidden_layer.{weight,bias}` `[q, z]`, `[q]` | `hidden.{weight,bias}` |
//! | `_mask_blocks.{i}._layer_norm.{weight,bias}` `[q]` | `output_norm.{weight,bias}` |
//! | `_mask_blocks.{i}._input_layer_norm.{weight,bias}` `[z]` | `input_norm.{weight,bias}` |
//!
//! A rankstack block reproduces Twitter's with `hidden_bias: true` and `activation: "identity"`.
//! Twitter's aggregation width is `int(reduction_factor · m)` (truncated): use
//! `aggregation_rounding: "truncate"` with `projection_ratio: rf`, or state the width with
//! `aggregation_dim` (rf 1.5 on m = 5: Twitter 7, rankstack's default rounding 8). Twitter's
//! blocks may differ from each other: a parallel config lists them in `blocks`. Twitter's optional
//! top MLP is not imported.

use std::collections::HashMap;

use candle_core::Tensor;
use rankstack_nn::state_dict::StateDictImport;
use rankstack_nn::{Activation, Error, Result};

use crate::{MaskBlockConfig, ParallelMaskNetConfig, SerialMaskNetConfig};

const LAYER: &str = "Twitter MaskNet import";

/// The rankstack MaskNet a Twitter MaskNet imports into: `use_parallel: true` is a
/// [`crate::ParallelMaskNet`], `false` a [`crate::SerialMaskNet`]. As JSON (`rankstack import
/// --config`): `{"parallel": {…ParallelMaskNetConfig}}` or `{"serial": {…SerialMaskNetConfig}}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MaskNetConfig {
    /// Twitter's `use_parallel: true`.
    Parallel(ParallelMaskNetConfig),
    /// Twitter's `use_parallel: false`.
    Serial(SerialMaskNetConfig),
}

/// The tensors of the MaskNet `config` describes on `input_dim` features, from a Twitter
/// `MaskNet` state dict (see the module docs for the mapping). Every Twitter tensor is checked —
/// missing, unexpected, mis-shaped, integer or non-finite ones are reported together under
/// Twitter's names. Refused: blocks without `hidden_bias` or with an activation (Twitter has a
/// biased hidden layer and no activation after the LayerNorm) and a top MLP.
pub fn from_twitter_state_dict(
    input_dim: usize,
    config: &MaskNetConfig,
    state: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    // (mask input width, masked input width, block config) per block.
    let blocks: Vec<(usize, MaskBlockConfig)> = match config {
        MaskNetConfig::Parallel(c) => {
            if c.top_mlp.is_some() {
                return Err(Error::config(LAYER, "top_mlp", "Twitter's MaskNet MLP is not imported; leave it out"));
            }
            c.block_configs(LAYER)?.into_iter().map(|(block, _)| (input_dim, block)).collect()
        }
        MaskNetConfig::Serial(c) => {
            let widths = std::iter::once(input_dim).chain(c.blocks.iter().map(|b| b.output_dim));
            widths.zip(c.blocks.iter().cloned()).collect()
        }
    };
    if blocks.is_empty() {
        return Err(Error::config(LAYER, "blocks", "needs at least one block"));
    }
    let mut import = StateDictImport::new("Twitter MaskNet", state);
    for (i, (z, block)) in blocks.into_iter().enumerate() {
        let prefix = format!("blocks[{i}].");
        if !block.hidden_bias {
            return Err(Error::config(
                LAYER,
                format!("{prefix}hidden_bias"),
                "Twitter's hidden layer has a bias: set it to true",
            ));
        }
        if block.activation != Activation::Identity {
            return Err(Error::config(
                LAYER,
                format!("{prefix}activation"),
                "Twitter's block has no activation after its LayerNorm: set it to \"identity\"",
            ));
        }
        let (m, t, q) = (input_dim, block.aggregation_width(LAYER, &prefix, input_dim)?, block.output_dim);
        let from = |name: &str| format!("_mask_blocks.{i}.{name}");
        let to = |name: &str| format!("blocks.{i}.{name}");
        let mut tensors = vec![
            ("_mask_layer.0.weight", "mask.aggregation.weight", vec![t, m]),
            ("_mask_layer.0.bias", "mask.aggregation.bias", vec![t]),
            ("_mask_layer.2.weight", "mask.projection.weight", vec![z, t]),
            ("_mask_layer.2.bias", "mask.projection.bias", vec![z]),
            ("_hidden_layer.weight", "hidden.weight", vec![q, z]),
            ("_hidden_layer.bias", "hidden.bias", vec![q]),
            ("_layer_norm.weight", "output_norm.weight", vec![q]),
            ("_layer_norm.bias", "output_norm.bias", vec![q]),
        ];
        if block.input_layer_norm {
            tensors.push(("_input_layer_norm.weight", "input_norm.weight", vec![z]));
            tensors.push(("_input_layer_norm.bias", "input_norm.bias", vec![z]));
        }
        for (theirs, ours, shape) in tensors {
            import.rename(&from(theirs), &shape, to(ours));
        }
    }
    import.finish()
}
