//! Finiteness checks of named tensors (parameters, optimizer state, gradients) on their own device.
//!
//! A model whose weights hold an infinity or a NaN can still produce a finite loss (ReLU maps NaN
//! activations to 0), so the loss alone does not reveal a diverged model. The trainer checks every
//! tensor before a checkpoint is published, and loaders check a file's tensors before serving it.
//!
//! The check runs where the tensor lives, in two passes. First `Σ t` per float tensor: a sum is
//! finite only if every element is (an infinity or a NaN makes it ±∞ or NaN). Only a tensor whose
//! sum is not finite — a non-finite element, or finite values whose sum overflows — is checked
//! exactly, with `Σ (t − t)`: exactly 0 when every element is finite, NaN otherwise (`∞ − ∞` and
//! `NaN − NaN` are NaN). The per-tensor sums are stacked and copied to the host once, so a GPU pays
//! one transfer of one float per tensor, not a copy of every weight.

use candle_core::{DType, Tensor};

use crate::host_transfer::{move_to_device, read_computed, Origin};
use crate::Result;

/// The name of the first tensor (in the given order) holding a non-finite value, or `None` when
/// every float tensor is finite. Integer tensors are finite by construction and skipped; an empty
/// tensor counts as finite.
pub fn first_non_finite<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> Result<Option<String>> {
    let tensors: Vec<(&str, &Tensor)> =
        tensors.into_iter().filter(|(_, t)| t.dtype().is_float() && t.elem_count() > 0).collect();
    let sums = per_tensor(&tensors, |t| t.sum_all())?;
    for (i, sum) in sums.iter().enumerate() {
        if !sum.is_finite() {
            // Non-finite, or a finite tensor whose sum overflows: the exact check decides.
            #[allow(clippy::eq_op)] // `t − t` on purpose: 0 for finite elements, NaN otherwise
            let exact = per_tensor(&tensors[i..=i], |t| (t - t)?.sum_all())?;
            if !exact[0].is_finite() {
                return Ok(Some(tensors[i].0.to_string()));
            }
        }
    }
    Ok(None)
}

/// `reduce` of every tensor, as f32 scalars stacked on the first tensor's device and copied to
/// the host in one transfer.
fn per_tensor(
    tensors: &[(&str, &Tensor)],
    reduce: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Vec<f32>> {
    let Some((_, first)) = tensors.first() else { return Ok(Vec::new()) };
    let device = first.device();
    let sums = tensors
        .iter()
        .map(|(_, t)| {
            let sum = reduce(t)?.to_dtype(DType::F32)?;
            // Tensors on another device than the first (never, in the trainer) join it.
            if sum.device().same_device(device) {
                Ok(sum)
            } else {
                move_to_device(&sum, device, "finiteness sum", Origin::Computed)
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(read_computed::<f32>(&Tensor::stack(&sums, 0)?, "finiteness sums")?)
}

/// The name of the first non-finite slice among host-side `f32` buffers (e.g. optimizer moments
/// kept on the host), or `None`. Tests the exponent bits (all ones: an infinity or a NaN) in
/// blocks, without an early exit inside a block, so the loop vectorises.
pub fn first_non_finite_host<'a>(buffers: impl IntoIterator<Item = (&'a str, &'a [f32])>) -> Option<String> {
    const EXPONENT: u32 = 0x7f80_0000;
    let non_finite = |values: &[f32]| {
        values.chunks(4096).any(|block| block.iter().fold(false, |any, v| any | (v.to_bits() & EXPONENT == EXPONENT)))
    };
    buffers.into_iter().find(|(_, values)| non_finite(values)).map(|(name, _)| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_the_first_non_finite_tensor_and_ignores_integers() {
        let d = Device::Cpu;
        let ok = Tensor::new(&[1.0f32, 3.0e38, 3.0e38], &d).unwrap(); // Σ t overflows: the exact check decides
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
        let mut long = vec![f32::MAX; 10_000];
        assert_eq!(first_non_finite_host([("long", &long[..])]), None);
        long[9_999] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite_host([("long", &long[..])]).as_deref(), Some("long"));
    }
}
