//! Checkpoints: a directory holding `config.json` (the [`RankerConfig`]) and `model.safetensors`
//! (every parameter and buffer under its model name). PyTorch models exported by
//! `reference/rankstack_ref` write the same layout, so "train in PyTorch, serve in Rust" is a load.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rankstack_nn::checkpoint::{bytes_checksum, load_into, mismatches, read_safetensors, TensorChecksum, CHECKSUM_KEY};
use rankstack_nn::packed_matmul::WeightPrecision;
use rankstack_nn::{Error, Result, SeededVarMap};

use crate::{Ranker, RankerConfig};

/// The config file inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// The tensor file inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename. A
/// crash at any moment leaves either the old file or the new one, never a torn one.
/// A failed write removes its temporary file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp).map_err(Error::io_at(&tmp))?;
        file.write_all(bytes).map_err(Error::io_at(&tmp))?;
        file.sync_all().map_err(Error::io_at(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(Error::io_at(path))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent() {
        // Persist the rename itself; failure to open a directory (some platforms) is not fatal.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The metadata key, in the weights file, of the checksum of the `config.json` written with it.
pub const CONFIG_CHECKSUM_KEY: &str = "rankstack.config_crc32";

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

/// Writes named tensors (and optional string metadata) to a safetensors file, atomically, with a
/// checksum of the tensors in the metadata ([`rankstack_nn::checkpoint::CHECKSUM_KEY`], verified
/// on reading).
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
    let views = sorted.iter().map(|(n, t)| Ok((n.as_str(), HostTensor::new(n, t)?))).collect::<Result<Vec<_>>>()?;
    let mut metadata = metadata.unwrap_or_default();
    let mut checksum = TensorChecksum::default();
    checksum.add_metadata(&metadata);
    for (name, view) in &views {
        checksum.add(name, view.1, view.0.dims(), &view.2);
    }
    metadata.insert(CHECKSUM_KEY.to_string(), checksum.finish());
    let mut bytes = safetensors::serialize(views.iter().map(|(n, v)| (*n, v)), Some(metadata))
        .map_err(|e| Error::Corrupt { path: path.display().to_string(), reason: e.to_string() })?;
    sort_header(&mut bytes).map_err(|reason| Error::Corrupt { path: path.display().to_string(), reason })?;
    write_atomically(path, &bytes)
}

/// Rewrites a serialized safetensors header with its keys in sorted order, in place: safetensors
/// writes the metadata map in hash order, which would make two saves of the same tensors differ
/// byte for byte (reproducible runs compare checkpoint files). Same keys and values, so the same
/// length; the padding to the header's size is spaces, as safetensors pads.
fn sort_header(bytes: &mut [u8]) -> std::result::Result<(), String> {
    fn sorted(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<(String, serde_json::Value)> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
            }
            other => other,
        }
    }
    let len = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    let header = len.and_then(|n| bytes.get(8..8 + n)).ok_or("header out of range")?;
    let (value, n) = (serde_json::from_slice::<serde_json::Value>(header).map_err(|e| e.to_string())?, header.len());
    let text = serde_json::to_vec(&sorted(value)).map_err(|e| e.to_string())?;
    let header = &mut bytes[8..8 + n];
    if text.len() > header.len() {
        return Err("the sorted header is longer than the original".into());
    }
    header[..text.len()].copy_from_slice(&text);
    header[text.len()..].fill(b' ');
    Ok(())
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

/// A tensor's little-endian bytes on the host, copied once, for safetensors' `View` and the
/// checksum.
struct HostTensor<'a>(&'a Tensor, safetensors::Dtype, Vec<u8>);

impl<'a> HostTensor<'a> {
    fn new(name: &str, tensor: &'a Tensor) -> Result<Self> {
        let t = tensor.flatten_all()?.to_device(&Device::Cpu)?;
        let (dtype, bytes) = match t.dtype() {
            DType::F64 => (safetensors::Dtype::F64, t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::F32 => (safetensors::Dtype::F32, t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::F16 => {
                (safetensors::Dtype::F16, t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            DType::BF16 => {
                (safetensors::Dtype::BF16, t.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            DType::I64 => (safetensors::Dtype::I64, t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::U32 => (safetensors::Dtype::U32, t.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::U8 => (safetensors::Dtype::U8, t.to_vec1::<u8>()?),
            other => {
                return Err(Error::input(
                    "checkpoint",
                    name,
                    format!("dtype {other:?} cannot be written to a checkpoint"),
                ))
            }
        };
        Ok(Self(tensor, dtype, bytes))
    }
}

impl safetensors::View for &HostTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.1
    }

    fn shape(&self) -> &[usize] {
        self.0.dims()
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.2)
    }

    fn data_len(&self) -> usize {
        self.2.len()
    }
}
