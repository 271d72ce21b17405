//! Reading tensor files and loading them into a model's parameters, with every mismatch reported.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result, TensorMismatch};
use crate::host_transfer::{move_to_device, Origin};

/// Tensors and string metadata read from a safetensors file.
#[derive(Debug)]
pub struct TensorFile {
    /// Tensors by name, on the CPU, in their stored dtype.
    pub tensors: HashMap<String, Tensor>,
    /// The file's `__metadata__` map (empty if absent).
    pub metadata: HashMap<String, String>,
}

/// The metadata key of a tensor file's checksum ([`TensorChecksum`]), written by rankstack's
/// checkpoint writer and verified by [`read_safetensors`] when present.
pub const CHECKSUM_KEY: &str = "rankstack.crc32";

/// A CRC-32 over a tensor file's metadata (every entry but the checksum itself, in key order) and
/// its tensors' names, dtypes, shapes and raw bytes, in name order: detects a damaged or modified
/// tensor file (a flipped bit in a weight would otherwise load as a valid, different model).
#[derive(Default)]
pub struct TensorChecksum(crc32fast::Hasher);

impl TensorChecksum {
    /// Adds one tensor (`dtype` as safetensors names it, e.g. `F32`).
    pub fn add(&mut self, name: &str, dtype: safetensors::Dtype, shape: &[usize], bytes: &[u8]) {
        self.0.update(format!("{name}:{dtype:?}:{shape:?}:").as_bytes());
        self.0.update(bytes);
    }

    /// Adds the metadata entries, in key order, leaving out [`CHECKSUM_KEY`].
    pub fn add_metadata(&mut self, metadata: &HashMap<String, String>) {
        let mut entries: Vec<(&String, &String)> = metadata.iter().filter(|(k, _)| *k != CHECKSUM_KEY).collect();
        entries.sort();
        for (key, value) in entries {
            self.0.update(format!("{key}={value}\n").as_bytes());
        }
    }

    /// The checksum as 8 hex digits.
    pub fn finish(self) -> String {
        format!("{:08x}", self.0.finalize())
    }
}

/// A CRC-32 (8 hex digits) of a whole byte string, e.g. a config file stored beside a tensor file.
pub fn bytes_checksum(bytes: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(bytes))
}

/// Reads a safetensors file. `BOOL` tensors are read as `u8` (0 or 1), since candle has no boolean
/// dtype. A missing file is an [`Error::Io`]; a truncated or corrupt one, or
/// one whose [`CHECKSUM_KEY`] does not match its tensors, is an [`Error::Corrupt`] naming the path.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<TensorFile> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let corrupt = |reason: String| Error::Corrupt { path: path.display().to_string(), reason };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    if let Some(stored) = metadata.get(CHECKSUM_KEY) {
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut views = file.tensors();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        let mut sum = TensorChecksum::default();
        sum.add_metadata(&metadata);
        for (name, view) in &views {
            sum.add(name, view.dtype(), view.shape(), view.data());
        }
        let actual = sum.finish();
        if &actual != stored {
            return Err(corrupt(format!(
                "checksum mismatch (stored {stored}, computed {actual}): the file was damaged or modified"
            )));
        }
    }
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let tensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let tensor = load_view(&view).map_err(|e| corrupt(format!("tensor `{name}`: {e}")))?;
            Ok((name, tensor))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    Ok(TensorFile { tensors, metadata })
}

/// One stored tensor on the CPU. candle 0.11 has no boolean dtype, so a `BOOL` tensor (a mask saved
/// by PyTorch) becomes `u8` holding 0 and 1; every other dtype loads as candle loads it.
fn load_view(view: &safetensors::tensor::TensorView<'_>) -> candle_core::Result<Tensor> {
    use candle_core::safetensors::Load;
    if view.dtype() == safetensors::Dtype::BOOL {
        let bits: Vec<u8> = view.data().iter().map(|&b| u8::from(b != 0)).collect();
        return Tensor::from_vec(bits, view.shape(), &Device::Cpu);
    }
    view.load(&Device::Cpu)
}

/// Compares a model's variables with a set of named tensors and lists every mismatch: missing,
/// unexpected, wrong shape, wrong dtype. An empty list means [`load_into`] will succeed.
pub fn mismatches(vars: &[(String, Var)], tensors: &HashMap<String, Tensor>) -> Vec<TensorMismatch> {
    let mut out = Vec::new();
    let wanted: BTreeSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    for (name, var) in vars {
        match tensors.get(name) {
            None => out.push(TensorMismatch::Missing { name: name.clone() }),
            Some(t) if t.dims() != var.dims() => out.push(TensorMismatch::Shape {
                name: name.clone(),
                expected: var.dims().to_vec(),
                actual: t.dims().to_vec(),
            }),
            Some(t) if t.dtype() != var.dtype() => out.push(TensorMismatch::DType {
                name: name.clone(),
                expected: format!("{:?}", var.dtype()),
                actual: format!("{:?}", t.dtype()),
            }),
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<&String> = tensors.keys().filter(|k| !wanted.contains(k.as_str())).collect();
    unexpected.sort();
    out.extend(unexpected.into_iter().map(|name| TensorMismatch::Unexpected { name: name.clone() }));
    out
}

/// Sets every variable from the tensor of the same name. Nothing is changed unless every name,
/// shape and dtype matches; otherwise all mismatches are returned in one [`Error::Checkpoint`].
pub fn load_into(vars: &[(String, Var)], tensors: &HashMap<String, Tensor>) -> Result<()> {
    let problems = mismatches(vars, tensors);
    if !problems.is_empty() {
        return Err(Error::Checkpoint(problems));
    }
    for (name, var) in vars {
        var.set(&move_to_device(&tensors[name], var.device(), "checkpoint tensor", Origin::State)?)?;
    }
    Ok(())
}

/// A [`VarBuilder`] backend that hands out a file's tensors as plain (non-variable) tensors, for
/// building a model to serve: no random initialisation, no [`Var`]s, so candle records no backward
/// graph and every intermediate tensor is freed as soon as the forward pass moves on.
///
/// Construction never fails on a mismatch: a missing or wrongly shaped tensor is recorded (and a
/// zero placeholder returned) so that [`FrozenTensors::finish`] can report every problem at once,
/// together with the file's tensors that nothing asked for.
///
/// ```
/// # use std::collections::HashMap;
/// # use candle_core::{DType, Device, Tensor};
/// use rankstack_nn::checkpoint::FrozenTensors;
/// let file = HashMap::from([("w".to_string(), Tensor::ones((2, 3), DType::F32, &Device::Cpu)?)]);
/// let tensors = FrozenTensors::new(file);
/// let vb = tensors.var_builder(DType::F32, &Device::Cpu);
/// let w = vb.get((2, 3), "w")?;
/// assert!(!w.is_variable());
/// tensors.finish(&[])?; // every tensor used, none missing
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct FrozenTensors {
    inner: Arc<FrozenInner>,
}

#[derive(Debug)]
struct FrozenInner {
    tensors: HashMap<String, Tensor>,
    requested: Mutex<BTreeSet<String>>,
    problems: Mutex<Vec<TensorMismatch>>,
}

impl FrozenTensors {
    /// Serves `tensors` (by name).
    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        Self {
            inner: Arc::new(FrozenInner {
                tensors,
                requested: Mutex::new(BTreeSet::new()),
                problems: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A [`VarBuilder`] over these tensors; float tensors are converted to `dtype`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// The tensor called `name`, if the file has it (for buffers that a model keeps outside its
    /// parameters).
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.inner.tensors.get(name)
    }

    /// Every problem met while building, plus the tensors that neither the model asked for nor
    /// `also_used` names (e.g. buffers loaded separately).
    pub fn problems(&self, also_used: &[String]) -> Vec<TensorMismatch> {
        let requested = self.inner.requested.lock().expect("lock poisoned");
        let mut problems = self.inner.problems.lock().expect("lock poisoned").clone();
        let mut unexpected: Vec<&String> =
            self.inner.tensors.keys().filter(|k| !requested.contains(k.as_str()) && !also_used.contains(k)).collect();
        unexpected.sort();
        problems.extend(unexpected.into_iter().map(|name| TensorMismatch::Unexpected { name: name.clone() }));
        problems
    }

    /// [`FrozenTensors::problems`] as one [`Error::Checkpoint`], if there are any.
    pub fn finish(&self, also_used: &[String]) -> Result<()> {
        let problems = self.problems(also_used);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Checkpoint(problems))
        }
    }
}

/// Whether a stored tensor of dtype `stored` may serve a request for `wanted`: float to float (the
/// requested precision), or the same dtype. An integer tensor where the model asks for a float
/// parameter is a mismatch, not something to convert.
fn convertible(stored: DType, wanted: DType) -> bool {
    stored == wanted || (stored.is_float() && wanted.is_float())
}

impl SimpleBackend for FrozenTensors {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.requested.lock().expect("lock poisoned").insert(name.to_string());
        let problem = match self.inner.tensors.get(name) {
            Some(t) if t.shape() == &s && convertible(t.dtype(), dtype) => {
                return move_to_device(&t.to_dtype(dtype)?, dev, "checkpoint tensor", Origin::State)
            }
            Some(t) if t.shape() == &s => TensorMismatch::DType {
                name: name.to_string(),
                expected: format!("{dtype:?}"),
                actual: format!("{:?}", t.dtype()),
            },
            Some(t) => {
                TensorMismatch::Shape { name: name.to_string(), expected: s.dims().to_vec(), actual: t.dims().to_vec() }
            }
            None => TensorMismatch::Missing { name: name.to_string() },
        };
        self.inner.problems.lock().expect("lock poisoned").push(problem);
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.requested.lock().expect("lock poisoned").insert(name.to_string());
        match self.inner.tensors.get(name) {
            Some(t) if convertible(t.dtype(), dtype) => {
                move_to_device(&t.to_dtype(dtype)?, dev, "checkpoint tensor", Origin::State)
            }
            Some(t) => candle_core::bail!("tensor `{name}` has dtype {:?}, the model expects {dtype:?}", t.dtype()),
            None => candle_core::bail!("no tensor named `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn reports_every_mismatch_at_once_and_changes_nothing() {
        let dev = Device::Cpu;
        let vars = vec![
            ("a".to_string(), Var::zeros((2, 3), DType::F32, &dev).unwrap()),
            ("b".to_string(), Var::zeros(3, DType::F32, &dev).unwrap()),
            ("c".to_string(), Var::zeros(1, DType::F32, &dev).unwrap()),
        ];
        let mut ts = HashMap::new();
        ts.insert("a".to_string(), Tensor::ones((3, 2), DType::F32, &dev).unwrap());
        ts.insert("b".to_string(), Tensor::ones(3, DType::F64, &dev).unwrap());
        ts.insert("zz".to_string(), Tensor::ones(1, DType::F32, &dev).unwrap());
        let err = load_into(&vars, &ts).unwrap_err();
        let msg = err.to_string();
        for needle in [
            "`a` has shape [3, 2], the model expects [2, 3]",
            "`b` has dtype F64",
            "missing tensor `c`",
            "unexpected tensor `zz`",
        ] {
            assert!(msg.contains(needle), "{msg}");
        }
        assert_eq!(vars[0].1.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn corrupt_and_missing_files_are_clear_errors() {
        let dir = crate::testing::ScratchDir::new("nn-ckpt");
        let good = dir.join("good.safetensors");
        let mut ts = HashMap::new();
        ts.insert("w".to_string(), Tensor::ones((4, 4), DType::F32, &Device::Cpu).unwrap());
        candle_core::safetensors::save(&ts, &good).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let truncated = dir.join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
        let err = read_safetensors(&truncated).unwrap_err().to_string();
        assert!(err.contains("truncated.safetensors") && err.contains("not a valid safetensors file"), "{err}");
        let err = read_safetensors(dir.join("nope.safetensors")).unwrap_err().to_string();
        assert!(err.contains("nope.safetensors"), "{err}");
        assert_eq!(read_safetensors(&good).unwrap().tensors["w"].dims(), &[4, 4]);
    }

    #[test]
    fn bool_tensors_written_by_pytorch_read_as_u8() {
        // `input.mask` is a torch.bool src_key_padding_mask saved by safetensors.torch
        // (reference/rankstack_ref/cases_peers.py): padded positions (0, 4), (1, 2..5).
        let path = crate::testing::fixtures_root().join("peers/torch_transformer_post_norm_b3_s5_d8.safetensors");
        let file = read_safetensors(&path).unwrap();
        let mask = &file.tensors["input.mask"];
        assert_eq!(mask.dtype(), DType::U8);
        let expected: Vec<Vec<u8>> = vec![vec![0, 0, 0, 0, 1], vec![0, 0, 1, 1, 1], vec![0, 0, 0, 0, 0]];
        assert_eq!(mask.to_vec2::<u8>().unwrap(), expected);
        // The float tensors of the same file load as before.
        assert_eq!(file.tensors["input.x"].dtype(), DType::F64);
    }

    #[test]
    fn frozen_tensors_are_plain_and_every_problem_is_reported() {
        let dev = Device::Cpu;
        let file = HashMap::from([
            ("a".to_string(), Tensor::ones((2, 3), DType::F64, &dev).unwrap()),
            ("b".to_string(), Tensor::ones(4, DType::F32, &dev).unwrap()),
            ("buffer".to_string(), Tensor::new(3i64, &dev).unwrap()),
            ("stray".to_string(), Tensor::ones(1, DType::F32, &dev).unwrap()),
            ("ints".to_string(), Tensor::new(&[1i64, 2], &dev).unwrap()),
        ]);
        let frozen = FrozenTensors::new(file);
        let vb = frozen.var_builder(DType::F32, &dev);
        let a = vb.get((2, 3), "a").unwrap();
        assert!(!a.is_variable() && a.dtype() == DType::F32);
        assert_eq!(vb.get(5, "b").unwrap().dims(), [5]); // placeholder; reported below
        vb.get(2, "c").unwrap();
        // An integer tensor where a float parameter is asked for is reported, not converted.
        assert_eq!(vb.get(2, "ints").unwrap().dtype(), DType::F32);
        let err = frozen.clone().var_builder(DType::F32, &dev).get_unchecked("ints").unwrap_err().to_string();
        assert!(err.contains("`ints` has dtype I64"), "{err}");
        let e = frozen.finish(&["buffer".to_string()]).unwrap_err().to_string();
        for needle in
            ["`b`", "missing tensor `c`", "unexpected tensor `stray`", "`ints` has dtype I64, the model expects F32"]
        {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        assert!(!e.contains("buffer") && !e.contains("`a`"), "{e}");
    }
}
