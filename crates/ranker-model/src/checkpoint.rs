//! Checkpoints: a directory holding `config.json` (the [`RankerConfig`]) and `model.safetensors`
//! (every parameter and buffer under its model name). PyTorch models exported by
//! `reference/rankstack_ref` write the same layout, so "train in PyTorch, serve in Rust" is a load.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rankstack_nn::checkpoint::{load_into, mismatches, read_safetensors};
use rankstack_nn::packed_matmul::WeightPrecision;
use rankstack_nn::{Error, Result, SeededVarMap};

use crate::{Ranker, RankerConfig};

/// The config file inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// The tensor file inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename. A
/// crash at any moment leaves either the old file or the new one, never a torn one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let mut file = std::fs::File::create(&tmp).map_err(Error::io_at(&tmp))?;
    file.write_all(bytes).map_err(Error::io_at(&tmp))?;
    file.sync_all().map_err(Error::io_at(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(Error::io_at(path))?;
    if let Some(dir) = path.parent() {
        // Persist the rename itself; failure to open a directory (some platforms) is not fatal.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Every tensor a checkpoint holds for this model: parameters (from `store`) and buffers.
pub fn state(ranker: &Ranker, store: &SeededVarMap) -> Vec<(String, Var)> {
    let mut all = store.named_vars();
    all.extend(ranker.buffers());
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Writes named tensors (and optional string metadata) to a safetensors file, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    // safetensors panics on a repeated name; report it instead.
    if let Some(pair) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::Corrupt {
            path: path.display().to_string(),
            reason: format!("tensor name `{}` appears twice", pair[0].0),
        });
    }
    let bytes = safetensors::serialize(sorted.iter().map(|(n, t)| (n.as_str(), TensorRef(t))), metadata)
        .map_err(|e| Error::Corrupt { path: path.display().to_string(), reason: e.to_string() })?;
    write_atomically(path, &bytes)
}

/// Saves the config and all tensors into `dir` (created if needed).
pub fn save(dir: impl AsRef<Path>, ranker: &Ranker, store: &SeededVarMap) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(Error::io_at(dir))?;
    let tensors: Vec<(String, Tensor)> =
        state(ranker, store).into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, None)?;
    let config = serde_json::to_string_pretty(ranker.config()).expect("a RankerConfig always serialises");
    write_atomically(&dir.join(CONFIG_FILE), config.as_bytes())
}

/// Loads a checkpoint directory into a new model on `device` in `dtype`. Every mismatch between
/// the file and the config (missing, unexpected, wrong shape or dtype) is reported at once.
pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<(Ranker, SeededVarMap)> {
    let dir = dir.as_ref();
    let config = RankerConfig::from_file(dir.join(CONFIG_FILE))?;
    let mut file = read_safetensors(dir.join(WEIGHTS_FILE))?;
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
    let config = RankerConfig::from_file(dir.join(CONFIG_FILE))?;
    let file = read_safetensors(dir.join(WEIGHTS_FILE))?;
    // A diverged or corrupt model must not score as if it were good (NaN probabilities downstream).
    if let Some(name) = first_non_finite(&file.tensors)? {
        return Err(Error::input(
            "checkpoint",
            dir.display().to_string(),
            format!("tensor `{name}` holds NaN or infinite values (training diverged, or the file is corrupt)"),
        ));
    }
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
    load_into(&buffers, &stored)?;
    Ok(ranker)
}

/// The name of the first float tensor (in name order) holding a NaN or an infinity.
fn first_non_finite(tensors: &HashMap<String, Tensor>) -> Result<Option<String>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        if t.dtype().is_float() {
            let flat = t.flatten_all()?;
            let finite = if t.dtype() == DType::F64 {
                flat.to_vec1::<f64>()?.iter().all(|v| v.is_finite())
            } else {
                flat.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().all(|v| v.is_finite())
            };
            if !finite {
                return Ok(Some(name.clone()));
            }
        }
    }
    Ok(None)
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

/// Adapts a candle tensor to safetensors' `View` (CPU copy of the data).
struct TensorRef<'a>(&'a Tensor);

impl safetensors::View for TensorRef<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self.0.dtype() {
            DType::F64 => safetensors::Dtype::F64,
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::I64 => safetensors::Dtype::I64,
            DType::U32 => safetensors::Dtype::U32,
            DType::U8 => safetensors::Dtype::U8,
            other => panic!("unsupported dtype {other:?} in a checkpoint"),
        }
    }

    fn shape(&self) -> &[usize] {
        self.0.dims()
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let t = self.0.flatten_all().and_then(|t| t.to_device(&Device::Cpu)).expect("readable tensor");
        let bytes: Vec<u8> = match t.dtype() {
            DType::F64 => t.to_vec1::<f64>().expect("f64").iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F32 => t.to_vec1::<f32>().expect("f32").iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => t.to_vec1::<half::f16>().expect("f16").iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::BF16 => t.to_vec1::<half::bf16>().expect("bf16").iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::I64 => t.to_vec1::<i64>().expect("i64").iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::U32 => t.to_vec1::<u32>().expect("u32").iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::U8 => t.to_vec1::<u8>().expect("u8"),
            other => panic!("unsupported dtype {other:?} in a checkpoint"),
        };
        std::borrow::Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.0.elem_count() * self.0.dtype().size_in_bytes()
    }
}
