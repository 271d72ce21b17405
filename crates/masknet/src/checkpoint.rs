//! A [`ParallelMaskNet`] or [`SerialMaskNet`] as a single-layer checkpoint
//! (`rankstack_nn::layer_checkpoint`: `layer.json` + `model.safetensors`), as
//! `rankstack import --from twitter-masknet` writes it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rankstack_nn::layer_checkpoint::{self, LayerSpec};
use rankstack_nn::{Result, SeededVarMap};

use crate::{MaskNetConfig, ParallelMaskNet, SerialMaskNet};

/// The `layer` of a [`ParallelMaskNet`] checkpoint's `layer.json`.
pub const PARALLEL_MASKNET_LAYER: &str = "ParallelMaskNet";
/// The `layer` of a [`SerialMaskNet`] checkpoint's `layer.json`.
pub const SERIAL_MASKNET_LAYER: &str = "SerialMaskNet";

/// Saves `tensors` as the checkpoint of the MaskNet `config` describes on `input_dim` features,
/// after checking that they build it; an existing `dir` is replaced only with `replace`.
pub fn save_masknet(
    dir: &Path,
    input_dim: usize,
    config: &MaskNetConfig,
    tensors: &HashMap<String, Tensor>,
    source: Option<String>,
    replace: bool,
) -> Result<()> {
    match config {
        MaskNetConfig::Parallel(c) => {
            let spec = LayerSpec::new(PARALLEL_MASKNET_LAYER, Some(input_dim), c, source);
            layer_checkpoint::save_checked(dir, &spec, tensors, replace, build_parallel)
        }
        MaskNetConfig::Serial(c) => {
            let spec = LayerSpec::new(SERIAL_MASKNET_LAYER, Some(input_dim), c, source);
            layer_checkpoint::save_checked(dir, &spec, tensors, replace, build_serial)
        }
    }
}

/// Loads a [`ParallelMaskNet`] checkpoint with trainable variables in `dtype` on `device`.
pub fn load_parallel_masknet(dir: &Path, dtype: DType, device: &Device) -> Result<(ParallelMaskNet, SeededVarMap)> {
    layer_checkpoint::build(dir, dtype, device, build_parallel)
}

/// Loads a [`SerialMaskNet`] checkpoint with trainable variables in `dtype` on `device`.
pub fn load_serial_masknet(dir: &Path, dtype: DType, device: &Device) -> Result<(SerialMaskNet, SeededVarMap)> {
    layer_checkpoint::build(dir, dtype, device, build_serial)
}

fn build_parallel(spec: &LayerSpec, vb: candle_nn::VarBuilder) -> Result<ParallelMaskNet> {
    spec.expect_layer(PARALLEL_MASKNET_LAYER)?;
    ParallelMaskNet::new(spec.required_input_dim()?, &spec.config()?, vb)
}

fn build_serial(spec: &LayerSpec, vb: candle_nn::VarBuilder) -> Result<SerialMaskNet> {
    spec.expect_layer(SERIAL_MASKNET_LAYER)?;
    SerialMaskNet::new(spec.required_input_dim()?, &spec.config()?, vb)
}
