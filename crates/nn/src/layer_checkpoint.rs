//! Single-layer checkpoints: one layer (a `CrossNet`, a `ParallelMaskNet`, a TransAct
//! `SequenceTransformer`, a `TransformerEncoder`) saved on its own, as `rankstack import` writes it.
//!
//! A checkpoint is a directory holding
//!
//! - `layer.json` ([`LayerSpec`]): which layer, its input width where the constructor takes one,
//!   its config (the layer crate's config type, as JSON) and where the weights came from;
//! - `model.safetensors`: every parameter under its rankstack name, written by
//!   [`crate::tensor_write::write_safetensors`] (sorted header, CRC-32 of the tensors) with the CRC-32
//!   of `layer.json` ([`CONFIG_CHECKSUM_KEY`]), as the ranker checkpoints do.
//!
//! [`save`] builds the directory beside its destination and renames it into place, so a failed or
//! interrupted save leaves nothing behind; an existing directory is replaced only when asked.
//! [`load`] refuses a damaged file, an edited `layer.json`, non-finite values, and (through
//! [`build`]) any tensor that does not fit the layer the spec describes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{bytes_checksum, mismatches, read_safetensors, FrozenTensors};
use crate::tensor_write::{write_atomically, write_safetensors, CONFIG_CHECKSUM_KEY};
use crate::{Error, Result, SeededVarMap};

/// The description file inside a single-layer checkpoint.
pub const LAYER_FILE: &str = "layer.json";
/// The tensor file inside a single-layer checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// What `layer.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// The layer type, e.g. `CrossNet`; the loader of another layer refuses the checkpoint.
    pub layer: String,
    /// The input width, for layers whose constructor takes one (`CrossNet`, `ParallelMaskNet`,
    /// `TransformerEncoder`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_dim: Option<usize>,
    /// The layer's config, in its crate's config format.
    pub config: serde_json::Value,
    /// Where the weights came from, e.g. `torchrec LowRankCrossNet` (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl LayerSpec {
    /// The spec of a `layer` built from `config` (serialised here, so that layer crates need no
    /// JSON dependency of their own).
    pub fn new(layer: &str, input_dim: Option<usize>, config: &impl Serialize, source: Option<String>) -> Self {
        let config = serde_json::to_value(config).expect("layer configs are plain serde structs");
        Self { layer: layer.to_string(), input_dim, config, source }
    }

    /// Refuses a spec of another layer type than `layer`.
    pub fn expect_layer(&self, layer: &str) -> Result<()> {
        if self.layer == layer {
            Ok(())
        } else {
            Err(Error::input(LAYER_FILE, "layer", format!("is `{}`, expected `{layer}`", self.layer)))
        }
    }

    /// The input width, which this layer type requires.
    pub fn required_input_dim(&self) -> Result<usize> {
        self.input_dim.ok_or_else(|| Error::input(LAYER_FILE, "input_dim", format!("{} needs one", self.layer)))
    }

    /// The config as the layer crate's config type (unknown or missing fields are errors).
    pub fn config<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.config.clone()).map_err(|e| Error::input(LAYER_FILE, "config", e.to_string()))
    }
}

/// Writes a single-layer checkpoint to `dir`. An existing `dir` is refused unless `replace`, and
/// even then unless it is a single-layer checkpoint or empty (`--force` must not delete a user's
/// other files); a non-finite tensor is refused (naming it) before anything is written.
pub fn save(dir: &Path, spec: &LayerSpec, tensors: &HashMap<String, Tensor>, replace: bool) -> Result<()> {
    if dir.exists() {
        let refuse = |reason: &str| Err(Error::input("checkpoint", dir.display().to_string(), reason));
        if !replace {
            return refuse("already exists; pass --force to replace it");
        }
        let empty = std::fs::read_dir(dir).map(|mut entries| entries.next().is_none()).unwrap_or(false);
        if !dir.is_dir() || !(empty || dir.join(LAYER_FILE).is_file()) {
            return refuse("exists and is not a single-layer checkpoint; refusing to replace it");
        }
    }
    let mut named: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(name) = crate::finite::first_non_finite(named.iter().map(|(n, t)| (n.as_str(), t)))? {
        return Err(Error::input(
            "checkpoint",
            dir.display().to_string(),
            format!("tensor `{name}` holds non-finite values; refusing to write it"),
        ));
    }
    let json = serde_json::to_string_pretty(spec).expect("a LayerSpec always serialises");
    let staging = sibling(dir, "tmp")?;
    let _ = std::fs::remove_dir_all(&staging);
    let written = (|| {
        std::fs::create_dir_all(&staging).map_err(Error::io_at(&staging))?;
        let meta = HashMap::from([(CONFIG_CHECKSUM_KEY.to_string(), bytes_checksum(json.as_bytes()))]);
        write_safetensors(&staging.join(WEIGHTS_FILE), &named, Some(meta))?;
        write_atomically(&staging.join(LAYER_FILE), json.as_bytes())?;
        swap_into_place(&staging, dir)
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    written
}

/// `.NAME.KIND-PID` beside `dir`: a private name for staging or for the directory being replaced.
fn sibling(dir: &Path, kind: &str) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::input("checkpoint", dir.display().to_string(), "is not a directory name"))?;
    Ok(dir.with_file_name(format!(".{}.{kind}-{}", name.to_string_lossy(), std::process::id())))
}

/// Renames `staging` to `dir`; an existing `dir` is first renamed aside and removed afterwards.
fn swap_into_place(staging: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        let old = sibling(dir, "old")?;
        std::fs::rename(dir, &old).map_err(Error::io_at(dir))?;
        std::fs::rename(staging, dir).map_err(Error::io_at(dir))?;
        std::fs::remove_dir_all(&old).map_err(Error::io_at(&old))
    } else {
        std::fs::rename(staging, dir).map_err(Error::io_at(dir))
    }
}

/// Reads a single-layer checkpoint: its spec and tensors, refusing a damaged weights file, a
/// `layer.json` that differs from the one the weights were written with, and non-finite values.
pub fn load(dir: &Path) -> Result<(LayerSpec, HashMap<String, Tensor>)> {
    let spec_path = dir.join(LAYER_FILE);
    let bytes = std::fs::read(&spec_path).map_err(Error::io_at(&spec_path))?;
    let spec: LayerSpec = serde_json::from_slice(&bytes)
        .map_err(|e| Error::input("checkpoint", spec_path.display().to_string(), e.to_string()))?;
    let weights = dir.join(WEIGHTS_FILE);
    let file = read_safetensors(&weights)?;
    if let Some(stored) = file.metadata.get(CONFIG_CHECKSUM_KEY) {
        let actual = bytes_checksum(&bytes);
        if &actual != stored {
            return Err(Error::input(
                "checkpoint",
                spec_path.display().to_string(),
                format!("checksum {actual} differs from the {stored} recorded in {WEIGHTS_FILE}: the file was damaged or modified"),
            ));
        }
    }
    let mut named: Vec<(&str, &Tensor)> = file.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    named.sort_by_key(|(n, _)| *n);
    if let Some(name) = crate::finite::first_non_finite(named)? {
        return Err(Error::input(
            "checkpoint",
            weights.display().to_string(),
            format!("tensor `{name}` holds non-finite values (a diverged or damaged model); refusing to load it"),
        ));
    }
    Ok((spec, file.tensors))
}

/// Checks, before anything is written, that `tensors` are exactly what `build` asks for when it
/// constructs the layer `spec` describes (names, shapes, float dtypes; every mismatch at once).
pub fn check_builds<M>(
    spec: &LayerSpec,
    tensors: &HashMap<String, Tensor>,
    build: impl FnOnce(&LayerSpec, VarBuilder) -> Result<M>,
) -> Result<()> {
    let frozen = FrozenTensors::new(tensors.clone());
    build(spec, frozen.var_builder(DType::F32, &Device::Cpu))?;
    frozen.finish(&[])
}

/// [`check_builds`], then [`save`]: the checkpoint of the layer `build` constructs from `spec`.
pub fn save_checked<M>(
    dir: &Path,
    spec: &LayerSpec,
    tensors: &HashMap<String, Tensor>,
    replace: bool,
    build: impl FnOnce(&LayerSpec, VarBuilder) -> Result<M>,
) -> Result<()> {
    check_builds(spec, tensors, build)?;
    save(dir, spec, tensors, replace)
}

/// Builds the layer a checkpoint holds, with trainable variables starting from its tensors (float
/// tensors converted to `dtype`): [`load`], then `build(spec, var_builder)`, then a check that the
/// layer asked for exactly the file's tensors with the file's shapes (every mismatch at once).
pub fn build<M>(
    dir: &Path,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(&LayerSpec, VarBuilder) -> Result<M>,
) -> Result<(M, SeededVarMap)> {
    let (spec, tensors) = load(dir)?;
    let tensors = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, if t.dtype().is_float() { t.to_dtype(dtype)? } else { t })))
        .collect::<Result<HashMap<_, _>>>()?;
    let store = SeededVarMap::with_initial_values(0, tensors.clone());
    let layer = build(&spec, store.var_builder(dtype, device))?;
    store.forget_initial_values();
    let problems = mismatches(&store.named_vars(), &tensors);
    if !problems.is_empty() {
        return Err(Error::Checkpoint(problems));
    }
    Ok((layer, store))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> crate::testing::ScratchDir {
        crate::testing::ScratchDir::new(&format!("layer-ckpt-{tag}"))
    }

    fn spec() -> LayerSpec {
        LayerSpec { layer: "Test".into(), input_dim: Some(2), config: serde_json::json!({"n": 1}), source: None }
    }

    #[test]
    fn saves_loads_and_never_overwrites_unasked() {
        let root = temp_dir("roundtrip");
        let dir = root.join("ckpt");
        let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let tensors = HashMap::from([("w".to_string(), w)]);
        save(&dir, &spec(), &tensors, false).unwrap();
        let err = save(&dir, &spec(), &tensors, false).unwrap_err().to_string();
        assert!(err.contains("already exists; pass --force"), "{err}");
        save(&dir, &spec(), &tensors, true).unwrap();
        // --force replaces a checkpoint, never another file or a directory of other files.
        let other = root.join("notes");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("a.txt"), "keep").unwrap();
        let file = root.join("file.txt");
        std::fs::write(&file, "keep").unwrap();
        for target in [&other, &file] {
            let err = save(target, &spec(), &tensors, true).unwrap_err().to_string();
            assert!(err.contains("is not a single-layer checkpoint"), "{err}");
        }
        assert_eq!(std::fs::read_to_string(other.join("a.txt")).unwrap(), "keep");
        std::fs::remove_dir_all(&other).unwrap();
        std::fs::remove_file(&file).unwrap();
        let (read, loaded) = load(&dir).unwrap();
        assert_eq!(read, spec());
        assert_eq!(loaded["w"].to_vec2::<f32>().unwrap(), [[1.0, 2.0], [3.0, 4.0]]);
        // Only the checkpoint is left: no staging or replaced directory.
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
        let (w, store) =
            build(&dir, DType::F64, &Device::Cpu, |_, vb| vb.get((2, 2), "w").map_err(Error::from)).unwrap();
        assert!(w.dtype() == DType::F64 && store.named_vars().len() == 1);
        let err = build(&dir, DType::F32, &Device::Cpu, |_, vb| vb.get(3, "v").map_err(Error::from)).unwrap_err();
        let err = err.to_string();
        assert!(err.contains("missing tensor `v`") && err.contains("unexpected tensor `w`"), "{err}");
    }

    #[test]
    fn refuses_non_finite_weights_and_edited_specs() {
        let root = temp_dir("refusals");
        let dir = root.join("ckpt");
        let bad = HashMap::from([("w".to_string(), Tensor::new(&[f32::INFINITY], &Device::Cpu).unwrap())]);
        let err = save(&dir, &spec(), &bad, false).unwrap_err().to_string();
        assert!(err.contains("tensor `w` holds non-finite values"), "{err}");
        assert!(!dir.exists() && std::fs::read_dir(&root).unwrap().count() == 0);
        let good = HashMap::from([("w".to_string(), Tensor::new(&[1f32], &Device::Cpu).unwrap())]);
        save(&dir, &spec(), &good, false).unwrap();
        let edited = std::fs::read_to_string(dir.join(LAYER_FILE)).unwrap().replace("\"n\": 1", "\"n\": 2");
        std::fs::write(dir.join(LAYER_FILE), edited).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("layer.json") && err.contains("damaged or modified"), "{err}");
    }
}
