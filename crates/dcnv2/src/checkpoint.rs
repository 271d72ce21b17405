//! A [`CrossNet`] as a single-layer checkpoint (`rankstack_nn::layer_checkpoint`: `layer.json` +
//! `model.safetensors`), as `rankstack import --from torchrec-…` writes it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rankstack_nn::layer_checkpoint::{self, LayerSpec};
use rankstack_nn::{Result, SeededVarMap};

use crate::{CrossNet, CrossNetConfig};

/// The `layer` of a [`CrossNet`] checkpoint's `layer.json`.
pub const CROSS_NET_LAYER: &str = "CrossNet";

/// The [`LayerSpec`] of a [`CrossNet`] on `input_dim` features; `source` says where its weights came from.
pub fn cross_net_spec(input_dim: usize, config: &CrossNetConfig, source: Option<String>) -> LayerSpec {
    LayerSpec::new(CROSS_NET_LAYER, Some(input_dim), config, source)
}

/// Saves `tensors` (a [`CrossNet`]'s parameters) as a checkpoint in `dir`, after checking that they
/// build the layer `config` describes; an existing `dir` is replaced only with `replace`.
pub fn save_cross_net(
    dir: &Path,
    input_dim: usize,
    config: &CrossNetConfig,
    tensors: &HashMap<String, Tensor>,
    source: Option<String>,
    replace: bool,
) -> Result<()> {
    layer_checkpoint::save_checked(dir, &cross_net_spec(input_dim, config, source), tensors, replace, build)
}

/// Loads a [`CrossNet`] checkpoint with trainable variables in `dtype` on `device`.
pub fn load_cross_net(dir: &Path, dtype: DType, device: &Device) -> Result<(CrossNet, SeededVarMap)> {
    layer_checkpoint::build(dir, dtype, device, build)
}

fn build(spec: &LayerSpec, vb: candle_nn::VarBuilder) -> Result<CrossNet> {
    spec.expect_layer(CROSS_NET_LAYER)?;
    CrossNet::new(spec.required_input_dim()?, &spec.config()?, vb)
}
