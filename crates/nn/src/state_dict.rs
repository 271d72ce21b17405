//! Importing a state dict written by another framework (torchrec, a TransAct or Twitter MaskNet
//! module, `torch.nn.TransformerEncoder`): the one place where peer tensors are renamed, reshaped,
//! split and checked, so that every layer crate's importer is a list of mappings.
//!
//! An importer states, for every tensor the peer module holds, its peer name, the shape that
//! module gives it for the config being imported into, and what it becomes in rankstack. The
//! [`StateDictImport`] records every problem instead of stopping at the first, and
//! [`StateDictImport::finish`] reports them all at once, under the peer's names: a tensor the
//! config needs and the file lacks, one with the wrong shape (expected and actual), one with an
//! integer dtype, one holding an infinity or a NaN, and every file tensor nothing asked for.
//!
//! ```
//! # use std::collections::HashMap;
//! # use candle_core::{DType, Device, Tensor};
//! use rankstack_nn::state_dict::StateDictImport;
//! let peer = HashMap::from([("bias.0".to_string(), Tensor::zeros((4, 1), DType::F32, &Device::Cpu)?)]);
//! let mut import = StateDictImport::new("torchrec CrossNet", peer);
//! import.reshape("bias.0", &[4, 1], "layers.0.bias", &[4]);
//! let tensors = import.finish()?;
//! assert_eq!(tensors["layers.0.bias"].dims(), &[4]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Tensor};

use crate::error::TensorMismatch;
use crate::{Error, Result};

/// A peer state dict being turned into rankstack-named tensors (see the module docs).
#[derive(Debug)]
pub struct StateDictImport {
    peer: String,
    source: HashMap<String, Tensor>,
    used: BTreeSet<String>,
    problems: Vec<TensorMismatch>,
    imported: HashMap<String, Tensor>,
}

impl StateDictImport {
    /// Imports from `source` (tensors by peer name); `peer` names the module in messages, e.g.
    /// `torchrec LowRankCrossNet`.
    pub fn new(peer: impl Into<String>, source: HashMap<String, Tensor>) -> Self {
        Self { peer: peer.into(), source, used: BTreeSet::new(), problems: Vec::new(), imported: HashMap::new() }
    }

    /// The peer tensor `name`, which must have shape `shape`, a float dtype (half precision is
    /// widened to f32) and finite values; `None` (with the problem recorded) otherwise.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Option<Tensor> {
        self.used.insert(name.to_string());
        let Some(tensor) = self.source.get(name) else {
            self.problems.push(TensorMismatch::Missing { name: name.to_string() });
            return None;
        };
        if tensor.dims() != shape {
            self.problems.push(TensorMismatch::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: tensor.dims().to_vec(),
            });
            return None;
        }
        let tensor = match tensor.dtype() {
            DType::F32 | DType::F64 => tensor.clone(),
            DType::F16 | DType::BF16 => match tensor.to_dtype(DType::F32) {
                Ok(t) => t,
                Err(e) => return self.failed(name, e),
            },
            other => {
                self.problems.push(TensorMismatch::DType {
                    name: name.to_string(),
                    expected: "a float dtype".into(),
                    actual: format!("{other:?}"),
                });
                return None;
            }
        };
        match crate::finite::first_non_finite([(name, &tensor)]) {
            Ok(None) => Some(tensor),
            Ok(Some(_)) => {
                self.problems.push(TensorMismatch::NonFinite { name: name.to_string() });
                None
            }
            Err(e) => self.failed(name, e),
        }
    }

    /// Records a candle failure on `name` (as a dtype problem, the only way reading a host tensor
    /// of a checked shape can fail).
    fn failed<T>(&mut self, name: &str, e: impl std::fmt::Display) -> Option<T> {
        self.problems.push(TensorMismatch::DType {
            name: name.to_string(),
            expected: "a readable float tensor".into(),
            actual: e.to_string(),
        });
        None
    }

    /// Stores `tensor` under the rankstack name `to`.
    pub fn put(&mut self, to: impl Into<String>, tensor: Tensor) {
        self.imported.insert(to.into(), tensor);
    }

    /// The peer tensor `from` (shape `shape`) becomes `to`, unchanged.
    pub fn rename(&mut self, from: &str, shape: &[usize], to: impl Into<String>) {
        if let Some(t) = self.take(from, shape) {
            self.put(to, t);
        }
    }

    /// The peer tensor `from`, stored with shape `stored`, becomes `to` with shape `target` (the
    /// same elements in the same order, e.g. torchrec's `[N, 1]` biases as `[N]`).
    pub fn reshape(&mut self, from: &str, stored: &[usize], to: impl Into<String>, target: &[usize]) {
        if let Some(t) = self.take(from, stored) {
            match t.reshape(target) {
                Ok(t) => self.put(to, t),
                Err(e) => {
                    self.failed::<()>(from, e);
                }
            }
        }
    }

    /// The peer tensor `from` of shape `stored = [K, rest…]` becomes `K` tensors of shape `rest`,
    /// the `k`-th named `to(k)` (e.g. torchrec's stacked experts, one rankstack tensor each).
    pub fn split(&mut self, from: &str, stored: &[usize], to: impl Fn(usize) -> String) {
        let Some(t) = self.take(from, stored) else { return };
        for k in 0..stored.first().copied().unwrap_or(0) {
            match t.get(k).and_then(|part| part.contiguous()) {
                Ok(part) => self.put(to(k), part),
                Err(e) => {
                    self.failed::<()>(from, e);
                    return;
                }
            }
        }
    }

    /// Accepts the peer tensor `name`, if present, without importing it: a buffer the peer keeps
    /// that has no rankstack counterpart (e.g. TransAct's `action_type_lookup`).
    pub fn skip(&mut self, name: &str) {
        self.used.insert(name.to_string());
    }

    /// The rankstack-named tensors, or every problem at once as [`Error::Import`] (unexpected
    /// tensors last, in name order).
    pub fn finish(mut self) -> Result<HashMap<String, Tensor>> {
        let mut unexpected: Vec<&String> = self.source.keys().filter(|k| !self.used.contains(*k)).collect();
        unexpected.sort();
        self.problems.extend(unexpected.into_iter().map(|name| TensorMismatch::Unexpected { name: name.clone() }));
        if self.problems.is_empty() {
            Ok(self.imported)
        } else {
            Err(Error::Import { peer: self.peer, problems: self.problems })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensors(entries: &[(&str, Tensor)]) -> HashMap<String, Tensor> {
        entries.iter().map(|(n, t)| (n.to_string(), t.clone())).collect()
    }

    #[test]
    fn renames_reshapes_and_splits() {
        let dev = Device::Cpu;
        let stacked = Tensor::arange(0f32, 12.0, &dev).unwrap().reshape((3, 2, 2)).unwrap();
        let mut import = StateDictImport::new(
            "peer",
            tensors(&[
                ("w", Tensor::ones((2, 2), DType::F64, &dev).unwrap()),
                ("b", Tensor::ones((2, 1), DType::BF16, &dev).unwrap()),
                ("k", stacked),
                ("buffer", Tensor::new(&[1i64], &dev).unwrap()),
            ]),
        );
        import.rename("w", &[2, 2], "layer.weight");
        import.reshape("b", &[2, 1], "layer.bias", &[2]);
        import.split("k", &[3, 2, 2], |k| format!("experts.{k}.weight"));
        import.skip("buffer");
        import.skip("absent buffer");
        let out = import.finish().unwrap();
        assert_eq!(out.len(), 5);
        assert_eq!(out["layer.bias"].dtype(), DType::F32);
        assert_eq!(out["layer.bias"].dims(), &[2]);
        assert_eq!(out["experts.2.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap(), [8.0, 9.0, 10.0, 11.0]);
    }

    #[test]
    fn every_problem_is_reported_under_the_peer_names() {
        let dev = Device::Cpu;
        let nan = Tensor::new(&[1f32, f32::NAN], &dev).unwrap();
        let mut import = StateDictImport::new(
            "torchrec CrossNet",
            tensors(&[
                ("kernels.0", Tensor::ones((3, 2), DType::F32, &dev).unwrap()),
                ("bias.0", nan),
                ("ids", Tensor::new(&[1i64, 2], &dev).unwrap()),
                ("stray", Tensor::ones(1, DType::F32, &dev).unwrap()),
            ]),
        );
        import.rename("kernels.0", &[2, 2], "layers.0.weight");
        import.rename("bias.0", &[2], "layers.0.bias");
        import.rename("ids", &[2], "x");
        import.rename("kernels.1", &[2, 2], "layers.1.weight");
        let msg = import.finish().unwrap_err().to_string();
        for needle in [
            "torchrec CrossNet state dict does not fit the config",
            "tensor `kernels.0` has shape [3, 2], the model expects [2, 2]",
            "tensor `bias.0` holds non-finite values",
            "tensor `ids` has dtype I64, the model expects a float dtype",
            "missing tensor `kernels.1`",
            "unexpected tensor `stray`",
        ] {
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
    }
}
