//! Checkpoints: a directory holding `config.json` (the [`RankerConfig`]) and `model.safetensors`
//! (every parameter and buffer under its model name). PyTorch models exported by
//! `reference/rankstack_ref` write the same layout, so "train in PyTorch, serve in Rust" is a load.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rankstack_nn::checkpoint::{bytes_checksum, load_into, mismatches, read_safetensors};
use rankstack_nn::packed_matmul::WeightPrecision;
pub use rankstack_nn::tensor_write::{write_atomically, write_safetensors, CONFIG_CHECKSUM_KEY};
use rankstack_nn::{Error, Result, SeededVarMap};

use crate::{Ranker, RankerConfig};

/// The config file inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// The tensor file inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// The checkpoint's config and the checksum of its bytes (see [`check_config_checksum`]).
fn read_config(dir: &Path) -> Result<(RankerConfig, String)> {
    let path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(Error::io_at(&path))?;
    Ok((RankerConfig::from_file(&path)?, bytes_checksum(&bytes)))
}

/// Refuses a `config.json` whose checksum differs from the one the weights file recorded for it
/// (files from other writers, without one, are not checked): a damaged or edited config would
/// build a different model around the same weights. Called after the tensors were found to fit
/// the config, so a config of another model is reported by its mismatches first.
fn check_config_checksum(dir: &Path, actual: &str, weights_metadata: &HashMap<String, String>) -> Result<()> {
    match weights_metadata.get(CONFIG_CHECKSUM_KEY) {
        Some(stored) if stored != actual => Err(Error::input(
            "checkpoint",
            dir.join(CONFIG_FILE).display().to_string(),
            format!("checksum {actual} differs from the {stored} recorded in {WEIGHTS_FILE}: the file was damaged or modified"),
        )),
        _ => Ok(()),
    }
}

/// Refuses a tensor file holding an infinity or a NaN (a diverged model, or a damaged file): such a
/// model is never served or trained on. Names the first such tensor in name order.
fn check_finite(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    named.sort_by_key(|(n, _)| *n);
    match rankstack_nn::finite::first_non_finite(named)? {
        None => Ok(()),
        Some(name) => Err(Error::input(
            "checkpoint",
            path.display().to_string(),
            format!("tensor `{name}` holds non-finite values (a diverged or damaged model); refusing to load it"),
        )),
    }
}

/// Every tensor a checkpoint holds for this model: parameters (from `store`) and buffers.
pub fn state(ranker: &Ranker, store: &SeededVarMap) -> Vec<(String, Var)> {
    let mut all = store.named_vars();
    all.extend(ranker.buffers());
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Saves the config and all tensors into `dir` (created if needed).
pub fn save(dir: impl AsRef<Path>, ranker: &Ranker, store: &SeededVarMap) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(Error::io_at(dir))?;
    let tensors: Vec<(String, Tensor)> =
        state(ranker, store).into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    let config = serde_json::to_string_pretty(ranker.config()).expect("a RankerConfig always serialises");
    let meta = HashMap::from([(CONFIG_CHECKSUM_KEY.to_string(), bytes_checksum(config.as_bytes()))]);
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, Some(meta))?;
    write_atomically(&dir.join(CONFIG_FILE), config.as_bytes())
}

/// Loads a checkpoint directory into a new model on `device` in `dtype`. Every mismatch between
/// the file and the config (missing, unexpected, wrong shape, an integer tensor where a float one
/// belongs or the reverse) is reported at once. Float parameters are converted to `dtype` (a
/// float64 export loads into an f32 model, as PyTorch's `load_state_dict` copies across float
/// dtypes). Refused as well: a tensor holding a non-finite value, and a file whose checksums
/// (when written by rankstack) do not match its tensors or its `config.json`.
pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<(Ranker, SeededVarMap)> {
    let dir = dir.as_ref();
    let (config, config_checksum) = read_config(dir)?;
    let mut file = read_safetensors(dir.join(WEIGHTS_FILE))?;
    check_finite(&dir.join(WEIGHTS_FILE), &file.tensors)?;
    // The parameters start from the file's values (no random draw to be overwritten); the check
    // and the buffers come below.
    let store = SeededVarMap::with_initial_values(0, file.tensors.clone());
    let ranker = Ranker::new(&config, store.var_builder(dtype, device))?;
    store.forget_initial_values();
    // Buffers keep their stored dtype in the model (e.g. num_batches_tracked is i64); parameters
    // are converted to the requested dtype only when the file is float.
    let buffers: std::collections::HashSet<String> = ranker.buffers().into_iter().map(|(n, _)| n).collect();
    for (name, t) in file.tensors.iter_mut() {
        if !buffers.contains(name) && t.dtype().is_float() && t.dtype() != dtype {
            *t = t.to_dtype(dtype)?;
        }
    }
    // Every name, shape and dtype at once.
    let problems = mismatches(&state(&ranker, &store), &file.tensors);
    if !problems.is_empty() {
        return Err(Error::Checkpoint(problems));
    }
    check_config_checksum(dir, &config_checksum, &file.metadata)?;
    // With no mismatch every parameter already holds its file value (the store started it from
    // there), so only the buffers are left to set.
    let buffer_values: HashMap<String, Tensor> =
        file.tensors.into_iter().filter(|(name, _)| buffers.contains(name)).collect();
    load_into(&ranker.buffers(), &buffer_values)?;
    Ok((ranker, store))
}

/// Loads a checkpoint directory for serving: the parameters are plain tensors straight from the
/// file (no random initialisation first, no [`candle_core::Var`]s), so candle records no backward
/// graph and frees each intermediate as soon as it is used. Scoring the `homefeed-bench` model at
/// batch 2048 peaked at 5.8 GiB of RSS with [`load`] and 1.8 GiB with this. Use [`load`] to train
/// or fine-tune. Every mismatch between file and config is reported at once, as with [`load`].
pub fn load_for_serving(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Ranker> {
    let dir = dir.as_ref();
    let (config, config_checksum) = read_config(dir)?;
    let file = read_safetensors(dir.join(WEIGHTS_FILE))?;
    check_finite(&dir.join(WEIGHTS_FILE), &file.tensors)?;
    let metadata = file.metadata.clone();
    let frozen = rankstack_nn::checkpoint::FrozenTensors::new(file.tensors);
    let ranker = Ranker::new(&config, frozen.var_builder(dtype, device))?;
    // Buffers (BatchNorm running statistics) live outside the parameters as variables, loaded
    // from the file (float ones converted to the buffer's dtype); evaluation reads them through
    // detached copies, so they add nothing to the graph.
    let buffers = ranker.buffers();
    let names: Vec<String> = buffers.iter().map(|(n, _)| n.clone()).collect();
    let mut problems = frozen.problems(&names);
    let mut stored = HashMap::new();
    for (name, var) in &buffers {
        if let Some(t) = frozen.tensor(name) {
            let same_kind = t.dtype().is_float() == var.dtype().is_float();
            stored.insert(name.clone(), if same_kind { t.to_dtype(var.dtype())? } else { t.clone() });
        }
    }
    problems.extend(mismatches(&buffers, &stored));
    if !problems.is_empty() {
        return Err(Error::Checkpoint(problems));
    }
    check_config_checksum(dir, &config_checksum, &metadata)?;
    load_into(&buffers, &stored)?;
    Ok(ranker)
}

/// [`load_for_serving`] on the CPU in f32, with every linear layer's weight packed once for the
/// AVX-512 kernel of [`rankstack_nn::packed_matmul`]:
///
/// - [`WeightPrecision::F32`]: the same weights; scores equal the unpacked model's up to f32
///   summation order. Layers stay unpacked where the kernel cannot run (no AVX-512).
/// - [`WeightPrecision::Bf16`]: linear weights rounded to bf16 (half their memory), activations
///   rounded to bf16 at each product, f32 accumulation, everything else (embeddings, norms,
///   attention products, element-wise work) in f32, like PyTorch's bf16 autocast. Twice the
///   multiply-add rate on CPUs with AVX512-BF16; elsewhere slower than f32 (see
///   [`rankstack_nn::packed_matmul::packed_kernel_available`]). How far probabilities move from
///   f32 grows with the model's logits: up to 1.4e-2 on the randomly initialised
///   `homefeed-bench` model (PyTorch's autocast: 2.0e-2; `cargo xtask bench-compare`), within
///   3e-3 on the presets trained on MovieLens-100k, 3.2e-2 on a model overfit to large logits
///   (`docs/performance.md`). Score a sample both ways before serving a model in bf16.
pub fn load_packed_for_serving(dir: impl AsRef<Path>, precision: WeightPrecision) -> Result<Ranker> {
    let mut ranker = load_for_serving(dir, DType::F32, &Device::Cpu)?;
    rankstack_nn::pack_linear_layers(&mut ranker, precision)?;
    Ok(ranker)
}

/// The serving model on `device`: on the CPU [`load_packed_for_serving`] (weights packed for the
/// CPU kernel in `precision`); on a GPU [`load_for_serving`] in f32, with every linear weight
/// converted to bf16 once for [`WeightPrecision::Bf16`] (products in bf16, f32 accumulation and
/// activations; see [`rankstack_nn::Linear::pack`]).
pub fn load_serving_model(dir: impl AsRef<Path>, precision: WeightPrecision, device: &Device) -> Result<Ranker> {
    if device.is_cpu() {
        return load_packed_for_serving(dir, precision);
    }
    let mut ranker = load_for_serving(dir, DType::F32, device)?;
    rankstack_nn::pack_linear_layers(&mut ranker, precision)?;
    Ok(ranker)
}
