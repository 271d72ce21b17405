//! A batched matrix product for many small matrices (attention scores and contexts).
//!
//! candle's CPU `matmul` runs the batch one matrix at a time and parallelises inside each product.
//! For attention in TransAct (`B·H` products of `100 × 48 × 100`) every product is too small to
//! split, so the threads mostly wait at candle's barrier. [`batched_matmul`] instead hands whole
//! products to the threads (each one single-threaded `gemm`), with a backward pass.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `a @ b` for `a` `[..., m, k]` and `b` `[..., k, n]` with equal batch dimensions `[...]`, the
/// same values as `a.matmul(b)` (each product is one `gemm` call either way), differentiable.
/// CPU `f32`/`f64` use the batch-parallel kernel; anything else falls back to `matmul`.
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 3 || ra != rb || !a.device().is_cpu() || a.dtype() != b.dtype() || !a.dtype().is_float() {
        return a.matmul(b);
    }
    let (batch_a, batch_b) = (&a.dims()[..ra - 2], &b.dims()[..rb - 2]);
    let (m, k, k2, n) = (a.dims()[ra - 2], a.dims()[ra - 1], b.dims()[rb - 2], b.dims()[rb - 1]);
    if batch_a != batch_b || k != k2 || !matches!(a.dtype(), candle_core::DType::F32 | candle_core::DType::F64) {
        return a.matmul(b); // candle's error messages for mismatched shapes
    }
    let count: usize = batch_a.iter().product();
    let a3 = a.contiguous()?.reshape((count, m, k))?;
    let b3 = b.contiguous()?.reshape((count, k, n))?;
    let mut dims = batch_a.to_vec();
    dims.extend([m, n]);
    // apply_op2 records the backward pass only when an input is part of a graph.
    a3.apply_op2(&b3, BatchedMatMul)?.reshape(dims)
}

/// `[N, m, k] × [N, k, n] → [N, m, n]`, contiguous inputs.
struct BatchedMatMul;

fn products<T: Copy + Send + Sync + 'static>(
    a: &[T],
    b: &[T],
    count: usize,
    (m, k, n): (usize, usize, usize),
    (zero, one): (T, T),
) -> Vec<T> {
    let mut out = vec![zero; count * m * n];
    out.par_chunks_mut(m * n).enumerate().for_each(|(i, dst)| {
        let (lhs, rhs) = (&a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n]);
        // SAFETY: the slices hold exactly the row-major m×k, k×n and m×n matrices described by
        // the dimensions and strides passed.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                lhs.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                1,
                n as isize,
                zero,
                one,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
    out
}

impl CustomOp2 for BatchedMatMul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("batched-matmul: contiguous inputs only");
        };
        let (count, m, k) = l1.shape().dims3()?;
        let (_, _, n) = l2.shape().dims3()?;
        let dims = (m, k, n);
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(products(&a[a0..a1], &b[b0..b1], count, dims, (0.0, 1.0)))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(products(&a[a0..a1], &b[b0..b1], count, dims, (0.0, 1.0)))
            }
            _ => candle_core::bail!("batched-matmul: f32 or f64 inputs of one dtype only"),
        };
        Ok((out, Shape::from((count, m, n))))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d(a b) = da b + a db:  ∂a = g bᵀ,  ∂b = aᵀ g.
        let grad_a = batched_matmul(&grad.detach(), &b.detach().transpose(1, 2)?)?;
        let grad_b = batched_matmul(&a.detach().transpose(1, 2)?, &grad.detach())?;
        Ok((Some(grad_a), Some(grad_b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::seeded_randn;
    use candle_core::{DType, Var};

    #[test]
    fn same_values_and_gradients_as_matmul() {
        for dtype in [DType::F32, DType::F64] {
            let a = Var::from_tensor(&seeded_randn(1, &[3, 2, 5, 7], dtype)).unwrap();
            let b = Var::from_tensor(&seeded_randn(2, &[3, 2, 7, 4], dtype)).unwrap();
            let r = seeded_randn(3, &[3, 2, 5, 4], dtype);
            let ours = batched_matmul(a.as_tensor(), b.as_tensor()).unwrap();
            let theirs = a.as_tensor().matmul(b.as_tensor()).unwrap();
            let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(flat(&ours), flat(&theirs), "{dtype:?} forward");
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("a", &a), ("b", &b)] {
                let (x, y) = (flat(g1.get(v.as_tensor()).unwrap()), flat(g2.get(v.as_tensor()).unwrap()));
                for (p, q) in x.iter().zip(&y) {
                    assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{dtype:?} ∂{name}: {p} vs {q}");
                }
            }
        }
    }

    #[test]
    fn transposed_inputs_and_untracked_inputs_work() {
        let a = seeded_randn(4, &[6, 3, 5], DType::F32);
        let b = seeded_randn(5, &[6, 4, 5], DType::F32).transpose(1, 2).unwrap(); // strided
        let ours = batched_matmul(&a, &b).unwrap();
        assert!(!ours.track_op());
        let theirs = a.matmul(&b.contiguous().unwrap()).unwrap();
        assert_eq!(ours.to_vec3::<f32>().unwrap(), theirs.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let a = seeded_randn(6, &[2, 3, 5], DType::F32);
        let b = seeded_randn(7, &[2, 4, 5], DType::F32);
        assert!(batched_matmul(&a, &b).is_err());
    }
}
