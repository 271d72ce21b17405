//! Max-pooling over the unmasked positions of a sequence, as one graph node.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use rankstack_nn::kernel_float::contiguous;
use rankstack_nn::KernelFloat;

/// `y[b, j] = max_{t : ¬masked[b, t]} h[b, t, j]` for `h` `[B, n, d]` and `masked` row-major
/// `[B, n]` (`true` = masked). Every row must keep at least one position (TransAct never masks
/// position 0). The gradient goes to the unmasked positions that attain the maximum, split equally
/// among them when several tie (PyTorch's rule for `amax`; TransAct has no positional encoding, so
/// two actions of the same type on the same item give equal rows and tie in every column). A NaN never wins a comparison, so it is ignored unless it is the only
/// unmasked value (then the result is `−∞`); ±∞ take part like any value.
///
/// On the CPU (f32/f64) one kernel forward and one backward; the composed version
/// (`where_cond` with a `−∞` tensor, then `max`) records two nodes whose backward passes build
/// several `[B, n, d]` temporaries, including a gradient for the constant `−∞` tensor.
pub fn masked_max_pool(h: &Tensor, masked: &[bool]) -> Result<Tensor> {
    let (b, n, _) = h.dims3()?;
    if masked.len() != b * n {
        candle_core::bail!("masked max-pool: {} mask entries for [{b}, {n}]", masked.len());
    }
    if masked.chunks(n.max(1)).any(|row| row.iter().all(|&m| m)) {
        candle_core::bail!("masked max-pool: a row has every position masked");
    }
    if h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::F64) {
        return h.contiguous()?.apply_op1(MaskedMax(Arc::new(masked.to_vec())));
    }
    composed_max_pool(h, masked)
}

/// [`masked_max_pool`] from candle's ops, for other devices and dtypes (same values, same
/// gradient rule).
fn composed_max_pool(h: &Tensor, masked: &[bool]) -> Result<Tensor> {
    let (b, n, d) = h.dims3()?;
    let mask = Tensor::from_vec(masked.iter().map(|&m| u8::from(m)).collect::<Vec<_>>(), (b, n, 1), h.device())?
        .broadcast_as((b, n, d))?
        .contiguous()?;
    let neg_inf = Tensor::full(f64::NEG_INFINITY, (b, n, d), h.device())?.to_dtype(h.dtype())?;
    let candidates = mask.where_cond(&neg_inf, h)?;
    let y = candidates.max(1)?.detach();
    // The value is the max; the gradient that of the mean over the tied positions (the CPU
    // kernel's rule): y + (share − share), with `share` the mean of the selected entries.
    let selected = candidates.broadcast_eq(&y.unsqueeze(1)?)?;
    let count = selected.to_dtype(h.dtype())?.sum(1)?;
    let share = selected.where_cond(h, &h.zeros_like()?)?.sum(1)?.div(&count)?;
    y + (&share - share.detach())?
}

// What the kernels' error messages call their inputs.
const INPUT: &str = "masked max-pool: input";
const OUTPUT: &str = "masked max-pool: output";
const GRADIENT: &str = "masked max-pool: gradient";

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
        let y = match storage {
            CpuStorage::F32(h) => CpuStorage::F32(pool(contiguous(h, layout, INPUT)?, &self.0, (n, d))),
            CpuStorage::F64(h) => CpuStorage::F64(pool(contiguous(h, layout, INPUT)?, &self.0, (n, d))),
            _ => candle_core::bail!("masked max-pool: the fused kernel takes f32 or f64"),
        };
        Ok((y, Shape::from((b, d))))
    }

    fn bwd(&self, h: &Tensor, y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        h.apply_op3_no_bwd(y, &grad_y.contiguous()?, &MaskedMaxBackward(self.0.clone())).map(Some)
    }
}

/// `(h, y, ∂L/∂y)` → `∂L/∂h`.
struct MaskedMaxBackward(Arc<Vec<bool>>);

impl MaskedMaxBackward {
    /// [`unpool`] on the contiguous values of `[(h, layout), (y, layout), (g, layout)]`.
    fn unpool<T: KernelFloat>(&self, [h, y, g]: [(&[T], &Layout); 3], (n, d): (usize, usize)) -> Result<Vec<T>> {
        let (h, y) = (contiguous(h.0, h.1, INPUT)?, contiguous(y.0, y.1, OUTPUT)?);
        Ok(unpool(h, y, contiguous(g.0, g.1, GRADIENT)?, &self.0, (n, d)))
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
        let dx = match (h, y, g) {
            (CpuStorage::F32(h), CpuStorage::F32(y), CpuStorage::F32(g)) => {
                CpuStorage::F32(self.unpool([(h, hl), (y, yl), (g, gl)], (n, d))?)
            }
            (CpuStorage::F64(h), CpuStorage::F64(y), CpuStorage::F64(g)) => {
                CpuStorage::F64(self.unpool([(h, hl), (y, yl), (g, gl)], (n, d))?)
            }
            _ => candle_core::bail!("masked max-pool backward: inputs must share one float dtype"),
        };
        Ok((dx, hl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_composed_version_in_value_and_gradient() {
        let (b, n, d) = (3, 5, 4);
        let masked: Vec<bool> = (0..b * n).map(|i| i % n != 0 && (i * 7) % 3 == 0).collect();
        for dtype in [DType::F32, DType::F64] {
            let h = Var::from_tensor(&rankstack_nn::testing::seeded_randn(1, &[b, n, d], dtype)).unwrap();
            let w = rankstack_nn::testing::seeded_randn(2, &[b, d], dtype);
            let run = |y: Tensor| {
                let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let flat =
                    |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                (flat(&y), flat(g.get(h.as_tensor()).unwrap()))
            };
            let fused = run(masked_max_pool(h.as_tensor(), &masked).unwrap());
            let mask =
                Tensor::from_vec(masked.iter().map(|&m| u8::from(m)).collect::<Vec<_>>(), (b, n, 1), &Device::Cpu)
                    .unwrap()
                    .broadcast_as((b, n, d))
                    .unwrap();
            let neg_inf = Tensor::full(f64::NEG_INFINITY, (b, n, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let composed = run(mask.where_cond(&neg_inf, h.as_tensor()).unwrap().max(1).unwrap());
            assert_eq!(fused, composed);
            assert_eq!(fused, run(composed_max_pool(h.as_tensor(), &masked).unwrap()));
        }
        // By hand: positions 0 and 2 tie in column 0 and share its gradient, in both versions.
        let h = Var::from_tensor(&Tensor::new(&[[[3f64, -2.], [9., 9.], [3., -5.]]], &Device::Cpu).unwrap()).unwrap();
        for pool in [masked_max_pool, composed_max_pool] {
            let y = pool(h.as_tensor(), &[false, true, false]).unwrap();
            assert_eq!(y.to_vec2::<f64>().unwrap(), vec![vec![3., -2.]]);
            let g = y.sum_all().unwrap().backward().unwrap();
            let dh = g.get(h.as_tensor()).unwrap().to_vec3::<f64>().unwrap();
            assert_eq!(dh, vec![vec![vec![0.5, 1.0], vec![0.0, 0.0], vec![0.5, 0.0]]]);
        }
        // By hand: the masked position 1 holds the largest value but is skipped.
        let h = Tensor::new(&[[[1f32, -2.], [9., 9.], [3., -5.]]], &Device::Cpu).unwrap();
        let y = masked_max_pool(&h, &[false, true, false]).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![3., -2.]]);
        assert!(masked_max_pool(&h, &[false, true]).is_err());
        assert!(masked_max_pool(&h, &[true, true, true]).is_err());
    }
}
