//! A batched matrix product for many small matrices (attention scores and contexts).
//!
//! candle's CPU `matmul` runs the batch one matrix at a time and parallelises inside each product.
//! For attention in TransAct (`B·H` products of `100 × 48 × 100`) every product is too small to
//! split, so the threads mostly wait at candle's barrier. [`batched_matmul`] instead hands whole
//! products to the threads (each one single-threaded `gemm`), with a backward pass.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernel_float::contiguous;

/// `a @ b` for `a` `[..., m, k]` and `b` `[..., k, n]` with equal batch dimensions `[...]`, the
/// same values as `a.matmul(b)` (each product is one `gemm` call either way), differentiable.
/// An input that is the transpose of a contiguous tensor (as `k.t()` in attention) is read in
/// place, without a copy. CPU `f32`/`f64` use the batch-parallel kernel; anything else falls back
/// to `matmul`.
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 3 || ra != rb || !a.device().is_cpu() || a.dtype() != b.dtype() {
        return a.matmul(b);
    }
    let (batch_a, batch_b) = (&a.dims()[..ra - 2], &b.dims()[..rb - 2]);
    let (m, k, k2, n) = (a.dims()[ra - 2], a.dims()[ra - 1], b.dims()[rb - 2], b.dims()[rb - 1]);
    if batch_a != batch_b || k != k2 || !matches!(a.dtype(), candle_core::DType::F32 | candle_core::DType::F64) {
        return a.matmul(b); // candle's error messages for mismatched shapes
    }
    let count: usize = batch_a.iter().product();
    let (a3, ta) = stored(a, count)?;
    let (b3, tb) = stored(b, count)?;
    let mut dims = batch_a.to_vec();
    dims.extend([m, n]);
    // apply_op2 records the backward pass only when an input is part of a graph.
    a3.apply_op2(&b3, BatchedMatMul { ta, tb })?.reshape(dims)
}

/// `x` `[..., r, c]` as a contiguous `[count, r, c]` tensor, or — when `x` is the transpose of a
/// contiguous tensor — that tensor `[count, c, r]` and `true` (no copy).
fn stored(x: &Tensor, count: usize) -> Result<(Tensor, bool)> {
    let rank = x.rank();
    let (r, c) = (x.dims()[rank - 2], x.dims()[rank - 1]);
    let t = x.transpose(rank - 2, rank - 1)?;
    if !x.is_contiguous() && t.is_contiguous() {
        return Ok((t.reshape((count, c, r))?, true));
    }
    Ok((x.contiguous()?.reshape((count, r, c))?, false))
}

/// `op(A) op(B)` for contiguous `A`, `B` `[N, ·, ·]`, where `op` transposes the stored matrices
/// when `ta` / `tb` is set.
#[derive(Debug, Clone, Copy)]
struct BatchedMatMul {
    ta: bool,
    tb: bool,
}

/// Row and column strides of `op(X)` for a stored row-major `rows × cols` matrix.
fn strides(cols: usize, transposed: bool) -> (isize, isize) {
    if transposed {
        (1, cols as isize)
    } else {
        (cols as isize, 1)
    }
}

impl BatchedMatMul {
    /// `(m, k, n)` of the product from the stored shapes `[N, ar, ac]` and `[N, br, bc]`.
    fn dims(&self, (ar, ac): (usize, usize), (br, bc): (usize, usize)) -> (usize, usize, usize) {
        let (m, k) = if self.ta { (ac, ar) } else { (ar, ac) };
        let n = if self.tb { br } else { bc };
        (m, k, n)
    }

    #[allow(clippy::too_many_arguments)]
    fn products<T: Copy + Send + Sync + 'static>(
        &self,
        a: &[T],
        b: &[T],
        count: usize,
        a_shape: (usize, usize),
        b_shape: (usize, usize),
        (zero, one): (T, T),
    ) -> Vec<T> {
        let (m, k, n) = self.dims(a_shape, b_shape);
        let (a_size, b_size) = (a_shape.0 * a_shape.1, b_shape.0 * b_shape.1);
        let (a_rs, a_cs) = strides(a_shape.1, self.ta);
        let (b_rs, b_cs) = strides(b_shape.1, self.tb);
        let mut out = vec![zero; count * m * n];
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, dst)| {
            let (lhs, rhs) = (&a[i * a_size..(i + 1) * a_size], &b[i * b_size..(i + 1) * b_size]);
            // SAFETY: `lhs` and `rhs` hold the stored matrices whose strides are passed, and
            // `dst` the row-major m×n result.
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
                    a_cs,
                    a_rs,
                    rhs.as_ptr(),
                    b_cs,
                    b_rs,
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
}

impl CustomOp2 for BatchedMatMul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        const A: &str = "batched-matmul: first input";
        const B: &str = "batched-matmul: second input";
        let (count, ar, ac) = l1.shape().dims3()?;
        let (_, br, bc) = l2.shape().dims3()?;
        let (m, _, n) = self.dims((ar, ac), (br, bc));
        let (sa, sb) = ((ar, ac), (br, bc));
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.products(contiguous(a, l1, A)?, contiguous(b, l2, B)?, count, sa, sb, (0.0, 1.0)))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.products(contiguous(a, l1, A)?, contiguous(b, l2, B)?, count, sa, sb, (0.0, 1.0)))
            }
            _ => candle_core::bail!("batched-matmul: f32 or f64 inputs of one dtype only"),
        };
        Ok((out, Shape::from((count, m, n))))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // C = op(A) op(B). Each gradient is again a product of stored tensors, so no transposed
        // copies are made (G is contiguous).
        let (a, b, g) = (a.detach(), b.detach(), grad.contiguous()?.detach());
        let op = |ta, tb, x: &Tensor, y: &Tensor| x.apply_op2_no_bwd(y, &BatchedMatMul { ta, tb });
        let (grad_a, grad_b) = match (self.ta, self.tb) {
            (false, false) => (op(false, true, &g, &b)?, op(true, false, &a, &g)?), // G Bᵀ, Aᵀ G
            (false, true) => (op(false, false, &g, &b)?, op(true, false, &g, &a)?), // G B, Gᵀ A
            (true, false) => (op(false, true, &b, &g)?, op(false, false, &a, &g)?), // B Gᵀ, A G
            (true, true) => (op(true, true, &b, &g)?, op(true, true, &g, &a)?),     // Bᵀ Gᵀ, Gᵀ Aᵀ
        };
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
    fn transposed_inputs_give_the_same_values_and_gradients() {
        // Every combination of plain and transposed (read in place) operands, f64 for exactness.
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let sa: &[usize] = if ta { &[2, 3, 7, 5] } else { &[2, 3, 5, 7] };
            let sb: &[usize] = if tb { &[2, 3, 4, 7] } else { &[2, 3, 7, 4] };
            let a = Var::from_tensor(&seeded_randn(10, sa, DType::F64)).unwrap();
            let b = Var::from_tensor(&seeded_randn(11, sb, DType::F64)).unwrap();
            let view =
                |v: &Var, t: bool| if t { v.as_tensor().transpose(2, 3).unwrap() } else { v.as_tensor().clone() };
            let (x, y) = (view(&a, ta), view(&b, tb));
            let r = seeded_randn(12, &[2, 3, 5, 4], DType::F64);
            let ours = batched_matmul(&x, &y).unwrap();
            let theirs = x.contiguous().unwrap().matmul(&y.contiguous().unwrap()).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for (p, q) in flat(&ours).iter().zip(flat(&theirs)) {
                assert!((p - q).abs() <= 1e-12 * (1.0 + q.abs()), "({ta}, {tb}) forward");
            }
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&a, &b] {
                let (p, q) = (flat(g1.get(v.as_tensor()).unwrap()), flat(g2.get(v.as_tensor()).unwrap()));
                for (p, q) in p.iter().zip(&q) {
                    assert!((p - q).abs() <= 1e-12 * (1.0 + q.abs()), "({ta}, {tb}) gradient");
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
        // The transposed operand is read in place: same products, summed in another order.
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (p, q) in flat(&ours).iter().zip(flat(&theirs)) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let a = seeded_randn(6, &[2, 3, 5], DType::F32);
        let b = seeded_randn(7, &[2, 4, 5], DType::F32);
        assert!(batched_matmul(&a, &b).is_err());
    }
}
