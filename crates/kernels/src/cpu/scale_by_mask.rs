//! `y = x ⊙ m` for a fixed host-drawn mask `m` (dropout's multipliers), as one CPU op.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::float::{dispatch, FloatKernel};
use crate::KernelFloat;

/// `x ⊙ mask` (the mask in `x`'s element order) as one fused pass whose backward pass only scales
/// the gradient by the same mask (a plain `x * mask` node would also compute and accumulate a
/// gradient for the mask); `None` where the kernel does not apply (not the CPU, not f32/f64).
pub fn scale_by_mask(x: &Tensor, mask: Arc<Vec<f32>>) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || !super::kernels_enabled() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return Ok(None);
    }
    if x.elem_count() != mask.len() {
        candle_core::bail!("dropout: mask of {} elements for an input of {}", mask.len(), x.elem_count());
    }
    x.contiguous()?.apply_op1(ScaleByMask(mask)).map(Some)
}

#[derive(Clone)]
struct ScaleByMask(Arc<Vec<f32>>);

impl FloatKernel for ScaleByMask {
    const NAME: &'static str = "dropout";

    fn run<T: KernelFloat>(&self, x: &[&[T]]) -> Result<Vec<T>> {
        let mut y = Vec::with_capacity(x[0].len());
        x[0].par_iter().zip(self.0.par_iter()).map(|(&v, &m)| v * T::from_f64(f64::from(m))).collect_into_vec(&mut y);
        Ok(y)
    }
}

impl CustomOp1 for ScaleByMask {
    fn name(&self) -> &'static str {
        "rankstack-dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((dispatch(self, &[(storage, layout)])?, layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        grad_y.contiguous()?.apply_op1(self.clone()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::oracle::{f64s, tensor};

    /// Value `x_i m_i` (rounded once) and gradient `m_i` (of `L = Σ y`), exactly, for f32 and f64.
    #[test]
    fn value_and_gradient_are_the_masked_input_and_the_mask() {
        let n = 10_003;
        let mask: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 0.0 } else { 1.5 }).collect();
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&tensor(4, &[n], dtype)).unwrap();
            let y = scale_by_mask(x.as_tensor(), Arc::new(mask.clone())).unwrap().unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            // One rounding in the input's type.
            let product = |x: f64, m: f32| match dtype {
                DType::F32 => f64::from(x as f32 * m),
                _ => x * f64::from(m),
            };
            let want: Vec<f64> = f64s(x.as_tensor()).iter().zip(&mask).map(|(&x, &m)| product(x, m)).collect();
            assert_eq!(f64s(&y), want, "{dtype:?}");
            assert_eq!(f64s(g.get(x.as_tensor()).unwrap()), mask.iter().map(|&m| f64::from(m)).collect::<Vec<_>>());
        }
        let x = tensor(1, &[3], DType::F32);
        assert!(scale_by_mask(&x, Arc::new(vec![1.0; 2])).unwrap_err().to_string().contains("mask of 2"));
        assert!(scale_by_mask(&x.to_dtype(DType::BF16).unwrap(), Arc::new(vec![1.0; 3])).unwrap().is_none());
    }
}
