//! Finiteness checks of named tensors (parameters, optimizer state, gradients) on their own device.
//!
//! A model whose weights hold an infinity or a NaN can still produce a finite loss (ReLU maps NaN
//! activations to 0), so the loss alone does not reveal a diverged model. The trainer checks every
//! tensor before a checkpoint is published, and loaders check a file's tensors before serving it.
//!
//! The check runs where the tensor lives: per float tensor, `Σ (t − t)` is exactly 0 when every
//! element is finite and NaN otherwise (`∞ − ∞` and `NaN − NaN` are NaN), and unlike `Σ t` it
//! cannot overflow on large finite values. The per-tensor sums are stacked and copied to the host
//! once, so a GPU pays one transfer of one float per tensor, not a copy of every weight.

use candle_core::{DType, Tensor};

use crate::Result;

/// The name of the first tensor (in the given order) holding a non-finite value, or `None` when
/// every float tensor is finite. Integer tensors are finite by construction and skipped; an empty
/// tensor counts as finite.
pub fn first_non_finite<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> Result<Option<String>> {
    let mut names = Vec::new();
    let mut sums: Vec<Tensor> = Vec::new();
    for (name, t) in tensors {
        if !t.dtype().is_float() || t.elem_count() == 0 {
            continue;
        }
        // `t − t` on purpose (0 for finite elements, NaN otherwise): not a typo for 0.
        #[allow(clippy::eq_op)]
        let difference = (t - t)?;
        let zero_if_finite = difference.sum_all()?.to_dtype(DType::F32)?;
        // One device for the stack: tensors of a model live on one device, but a caller may mix a
        // host-side optimizer state with device weights.
        let zero_if_finite = match sums.first() {
            Some(first) if !zero_if_finite.device().same_device(first.device()) => {
                zero_if_finite.to_device(first.device())?
            }
            _ => zero_if_finite,
        };
        names.push(name);
        sums.push(zero_if_finite);
    }
    if sums.is_empty() {
        return Ok(None);
    }
    let values = Tensor::stack(&sums, 0)?.to_vec1::<f32>()?;
    Ok(values.iter().position(|v| !v.is_finite()).map(|i| names[i].to_string()))
}

/// The name of the first non-finite slice among host-side `f32` buffers (e.g. optimizer moments
/// kept on the host), or `None`.
pub fn first_non_finite_host<'a>(buffers: impl IntoIterator<Item = (&'a str, &'a [f32])>) -> Option<String> {
    buffers.into_iter().find(|(_, values)| values.iter().any(|v| !v.is_finite())).map(|(name, _)| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_the_first_non_finite_tensor_and_ignores_integers() {
        let d = Device::Cpu;
        let ok = Tensor::new(&[1.0f32, -3.0e38, 3.0e38], &d).unwrap(); // Σ t would overflow
        let inf = Tensor::new(&[1.0f32, f32::INFINITY], &d).unwrap();
        let nan = Tensor::new(&[f64::NAN, 0.0], &d).unwrap();
        let ids = Tensor::new(&[1i64, 2], &d).unwrap();
        let empty = Tensor::zeros(0, DType::F32, &d).unwrap();
        assert_eq!(first_non_finite([("a", &ok), ("i", &ids), ("e", &empty)]).unwrap(), None);
        assert_eq!(first_non_finite([("a", &ok), ("b", &nan), ("c", &inf)]).unwrap().as_deref(), Some("b"));
        assert_eq!(first_non_finite([("c", &inf), ("b", &nan)]).unwrap().as_deref(), Some("c"));
        let neg_inf = Tensor::new(&[[f32::NEG_INFINITY]], &d).unwrap();
        assert_eq!(first_non_finite([("w", &neg_inf)]).unwrap().as_deref(), Some("w"));
        assert_eq!(first_non_finite(std::iter::empty()).unwrap(), None);
    }

    #[test]
    fn host_buffers() {
        let (a, b) = ([1.0f32, 2.0], [0.0f32, f32::NAN]);
        assert_eq!(first_non_finite_host([("m.a", &a[..]), ("m.b", &b[..])]).as_deref(), Some("m.b"));
        assert_eq!(first_non_finite_host([("m.a", &a[..])]), None);
    }
}
