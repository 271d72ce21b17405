//! Max-pooling over the unmasked positions of a sequence, as one CPU graph node.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::float::{dispatch, FloatKernel};
use crate::KernelFloat;

/// `y[b, j] = max_{t : ¬masked[b, t]} h[b, t, j]` for `h` `[B, n, d]` and `masked` row-major
/// `[B, n]` (`true` = masked), as one op forward and one backward; `None` where the kernel does
/// not apply (not the CPU, not f32/f64), so the caller falls back to composed operations.
///
/// The caller checks that `masked` has `B·n` entries and that every row keeps a position. The
/// gradient goes to the unmasked positions that attain the maximum, split equally among them when
/// several tie (PyTorch's rule for `amax`). A NaN never wins a comparison, so it is ignored unless it is the only unmasked value (then the
/// result is `−∞`); ±∞ take part like any value.
pub fn masked_max_pool_fused(h: &Tensor, masked: &[bool]) -> Result<Option<Tensor>> {
    let (b, n, _) = h.dims3()?;
    if masked.len() != b * n {
        candle_core::bail!("masked max-pool: {} mask entries for [{b}, {n}]", masked.len());
    }
    if !h.device().is_cpu() || !super::kernels_enabled() || !matches!(h.dtype(), DType::F32 | DType::F64) {
        return Ok(None);
    }
    h.contiguous()?.apply_op1(MaskedMax(Arc::new(masked.to_vec()))).map(Some)
}

#[derive(Clone)]
struct MaskedMax(Arc<Vec<bool>>);

fn pool<T: KernelFloat>(h: &[T], masked: &[bool], (n, d): (usize, usize)) -> Vec<T> {
    let mut y = vec![T::NEG_INFINITY; h.len() / n];
    y.par_chunks_mut(d).zip(h.par_chunks(n * d)).zip(masked.par_chunks(n)).for_each(|((y, h), m)| {
        for (t, row) in h.chunks(d).enumerate() {
            if !m[t] {
                y.iter_mut().zip(row).for_each(|(yj, &v)| {
                    if v > *yj {
                        *yj = v
                    }
                });
            }
        }
    });
    y
}

fn unpool<T: KernelFloat>(h: &[T], y: &[T], g: &[T], masked: &[bool], (n, d): (usize, usize)) -> Vec<T> {
    let mut dx = vec![T::ZERO; h.len()];
    dx.par_chunks_mut(n * d).zip(h.par_chunks(n * d)).enumerate().for_each(|(b, (dx, h))| {
        let (y, g, m) = (&y[b * d..][..d], &g[b * d..][..d], &masked[b * n..][..n]);
        // Positions tied at the maximum share its gradient equally (PyTorch's `amax` rule: a
        // subgradient, where giving each the whole gradient would count it once per tie).
        let mut ties = vec![0usize; d];
        for t in (0..n).filter(|&t| !m[t]) {
            for j in 0..d {
                ties[j] += usize::from(h[t * d + j] == y[j]);
            }
        }
        for t in (0..n).filter(|&t| !m[t]) {
            for j in 0..d {
                if h[t * d + j] == y[j] {
                    dx[t * d + j] = if ties[j] == 1 { g[j] } else { g[j] / T::from_f64(ties[j] as f64) };
                }
            }
        }
    });
    dx
}

impl CustomOp1 for MaskedMax {
    fn name(&self) -> &'static str {
        "rankstack-masked-max-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, d) = layout.shape().dims3()?;
        let pool = Pool { masked: &self.0, n, d, backward: false };
        Ok((dispatch(&pool, &[(storage, layout)])?, Shape::from((b, d))))
    }

    fn bwd(&self, h: &Tensor, y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        h.apply_op3_no_bwd(y, &grad_y.contiguous()?, &MaskedMaxBackward(self.0.clone())).map(Some)
    }
}

/// `(h, y, ∂L/∂y)` → `∂L/∂h`.
struct MaskedMaxBackward(Arc<Vec<bool>>);

/// The typed kernels: [`pool`] on `(h)`, or [`unpool`] on `(h, y, ∂L/∂y)`.
struct Pool<'a> {
    masked: &'a [bool],
    n: usize,
    d: usize,
    backward: bool,
}

impl FloatKernel for Pool<'_> {
    const NAME: &'static str = "masked max-pool";

    fn run<T: KernelFloat>(&self, x: &[&[T]]) -> Result<Vec<T>> {
        Ok(match self.backward {
            false => pool(x[0], self.masked, (self.n, self.d)),
            true => unpool(x[0], x[1], x[2], self.masked, (self.n, self.d)),
        })
    }
}

impl CustomOp3 for MaskedMaxBackward {
    fn name(&self) -> &'static str {
        "rankstack-masked-max-pool-backward"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        hl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, n, d) = hl.shape().dims3()?;
        let unpool = Pool { masked: &self.0, n, d, backward: true };
        Ok((dispatch(&unpool, &[(h, hl), (y, yl), (g, gl)])?, hl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::oracle::{f64s, tensor};

    /// The formula in f64: per row and column, the maximum over unmasked positions, and the
    /// gradient `r` split equally over the unmasked positions attaining it.
    fn oracle(h: &[f64], r: &[f64], masked: &[bool], (b, n, d): (usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
        let (mut y, mut dh) = (vec![f64::NEG_INFINITY; b * d], vec![0.0; h.len()]);
        for i in 0..b {
            for j in 0..d {
                for t in (0..n).filter(|&t| !masked[i * n + t]) {
                    y[i * d + j] = y[i * d + j].max(h[(i * n + t) * d + j]);
                }
                let at: Vec<usize> =
                    (0..n).filter(|&t| !masked[i * n + t] && h[(i * n + t) * d + j] == y[i * d + j]).collect();
                for t in &at {
                    dh[(i * n + t) * d + j] = r[i * d + j] / at.len() as f64;
                }
            }
        }
        (y, dh)
    }

    #[test]
    fn matches_the_f64_oracle_in_value_and_gradient() {
        let (b, n, d) = (3, 5, 4);
        let masked: Vec<bool> = (0..b * n).map(|i| i % n != 0 && (i * 7) % 3 == 0).collect();
        for dtype in [DType::F32, DType::F64] {
            let h = Var::from_tensor(&tensor(1, &[b, n, d], dtype)).unwrap();
            let r = tensor(2, &[b, d], dtype);
            let y = masked_max_pool_fused(h.as_tensor(), &masked).unwrap().unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (ey, edh) = oracle(&f64s(h.as_tensor()), &f64s(&r), &masked, (b, n, d));
            assert_eq!(f64s(&y), ey, "{dtype:?}: y");
            assert_eq!(f64s(g.get(h.as_tensor()).unwrap()), edh, "{dtype:?}: ∂h");
        }
    }

    /// The masked position 1 holds the largest value but is skipped; positions 0 and 2 tie in
    /// column 0 and share its gradient.
    #[test]
    fn hand_checkable_case_and_bad_masks() {
        let h = Var::new(&[[[3f32, -2.], [9., 9.], [3., -5.]]], &Device::Cpu).unwrap();
        let y = masked_max_pool_fused(h.as_tensor(), &[false, true, false]).unwrap().unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![3., -2.]]);
        let g = y.sum_all().unwrap().backward().unwrap();
        let dh = g.get(h.as_tensor()).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(dh, vec![vec![vec![0.5, 1.0], vec![0.0, 0.0], vec![0.5, 0.0]]]);
        let h = h.as_tensor();
        assert!(masked_max_pool_fused(h, &[false, true]).is_err());
        assert!(masked_max_pool_fused(&h.to_dtype(DType::BF16).unwrap(), &[false; 3]).unwrap().is_none());
    }
}
