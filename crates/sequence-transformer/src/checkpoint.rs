//! A [`SequenceTransformer`] (TransAct) or a [`TransformerEncoder`] as a single-layer checkpoint
//! (`rankstack_nn::layer_checkpoint`: `layer.json` + `model.safetensors`), as
//! `rankstack import --from transact|torch-transformer` writes it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rankstack_nn::layer_checkpoint::{self, LayerSpec};
use rankstack_nn::{Result, SeededVarMap};

use crate::{SequenceTransformer, SequenceTransformerConfig, TorchTransformerConfig, TransformerEncoder};

/// The `layer` of a [`SequenceTransformer`] checkpoint's `layer.json`.
pub const SEQUENCE_TRANSFORMER_LAYER: &str = "SequenceTransformer";
/// The `layer` of a [`TransformerEncoder`] checkpoint's `layer.json` (config: [`TorchTransformerConfig`]).
pub const TRANSFORMER_ENCODER_LAYER: &str = "TransformerEncoder";

/// Saves `tensors` as a [`SequenceTransformer`] checkpoint after checking that they build it; an
/// existing `dir` is replaced only with `replace`.
pub fn save_sequence_transformer(
    dir: &Path,
    config: &SequenceTransformerConfig,
    tensors: &HashMap<String, Tensor>,
    source: Option<String>,
    replace: bool,
) -> Result<()> {
    let spec = LayerSpec::new(SEQUENCE_TRANSFORMER_LAYER, None, config, source);
    layer_checkpoint::save_checked(dir, &spec, tensors, replace, build_sequence_transformer)
}

/// Loads a [`SequenceTransformer`] checkpoint with trainable variables in `dtype` on `device`.
pub fn load_sequence_transformer(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(SequenceTransformer, SeededVarMap)> {
    layer_checkpoint::build(dir, dtype, device, build_sequence_transformer)
}

/// Saves `tensors` as a [`TransformerEncoder`] checkpoint after checking that they build it; an
/// existing `dir` is replaced only with `replace`.
pub fn save_transformer_encoder(
    dir: &Path,
    config: &TorchTransformerConfig,
    tensors: &HashMap<String, Tensor>,
    source: Option<String>,
    replace: bool,
) -> Result<()> {
    let spec = LayerSpec::new(TRANSFORMER_ENCODER_LAYER, Some(config.d_model), config, source);
    layer_checkpoint::save_checked(dir, &spec, tensors, replace, build_transformer_encoder)
}

/// Loads a [`TransformerEncoder`] checkpoint with trainable variables in `dtype` on `device`.
pub fn load_transformer_encoder(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(TransformerEncoder, SeededVarMap)> {
    layer_checkpoint::build(dir, dtype, device, build_transformer_encoder)
}

fn build_sequence_transformer(spec: &LayerSpec, vb: candle_nn::VarBuilder) -> Result<SequenceTransformer> {
    spec.expect_layer(SEQUENCE_TRANSFORMER_LAYER)?;
    SequenceTransformer::new(&spec.config()?, vb)
}

fn build_transformer_encoder(spec: &LayerSpec, vb: candle_nn::VarBuilder) -> Result<TransformerEncoder> {
    spec.expect_layer(TRANSFORMER_ENCODER_LAYER)?;
    spec.config::<TorchTransformerConfig>()?.build(vb)
}
