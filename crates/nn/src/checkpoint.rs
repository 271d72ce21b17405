//! Reading tensor files and loading them into a model's parameters, with every mismatch reported.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use crate::error::{Error, Result, TensorMismatch};

/// Tensors and string metadata read from a safetensors file.
#[derive(Debug)]
pub struct TensorFile {
    /// Tensors by name, on the CPU, in their stored dtype.
    pub tensors: HashMap<String, Tensor>,
    /// The file's `__metadata__` map (empty if absent).
    pub metadata: HashMap<String, String>,
}

/// Reads a safetensors file. A missing file is an [`Error::Io`]; a truncated or corrupt one is an
/// [`Error::Corrupt`] naming the path.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<TensorFile> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let corrupt = |reason: String| Error::Corrupt { path: path.display().to_string(), reason };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| corrupt(e.to_string()))?;
    Ok(TensorFile { tensors, metadata })
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
        var.set(&tensors[name].to_device(var.device())?)?;
    }
    Ok(())
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
        let dir = std::env::temp_dir().join(format!("rankstack-nn-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        std::fs::remove_dir_all(&dir).ok();
    }
}
