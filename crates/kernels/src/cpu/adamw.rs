//! The AdamW update of one CPU `f32` parameter in place, fused into one pass over
//! `(θ, m, v, g)` (the training loop's optimizer lives in the top crate's `train::adamw`).

use std::sync::Mutex;

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

use crate::float::{contiguous, contiguous_mut};

/// The per-step constants of the update, in `f32`: the values the tensor version of the update
/// multiplies by, so that both give the same bits.
#[derive(Debug, Clone, Copy)]
pub struct AdamWCoefficients {
    pub(crate) beta1: f32,
    pub(crate) one_minus_beta1: f32,
    pub(crate) beta2: f32,
    pub(crate) one_minus_beta2: f32,
    pub(crate) inv_bc1: f32,
    pub(crate) inv_bc2: f32,
    pub(crate) eps: f32,
    pub(crate) decay: f32,
    pub(crate) lr: f32,
    /// The factor every gradient is multiplied by first (gradient clipping's; 1 without).
    pub(crate) grad_scale: f32,
}

/// AdamW's bias corrections of step `t ≥ 1`: `(1 − β₁ᵗ, 1 − β₂ᵗ)`, in f64 (the one definition the
/// fused update and the tensor version share).
pub fn bias_corrections(beta1: f64, beta2: f64, t: i32) -> (f64, f64) {
    (1.0 - beta1.powi(t), 1.0 - beta2.powi(t))
}

impl AdamWCoefficients {
    /// The constants of step `t ≥ 1` with learning rate `lr`: [`bias_corrections`] and the
    /// decoupled weight decay `1 − lr · weight_decay`.
    pub fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64, lr: f64, t: i32) -> Self {
        let (bc1, bc2) = bias_corrections(beta1, beta2, t);
        Self {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: eps as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            lr: lr as f32,
            grad_scale: 1.0,
        }
    }

    /// These constants with every gradient multiplied by `scale` first (gradient clipping's
    /// `max_norm / (norm + 1e-6)`), as the tensor `g · scale` in the gradient's dtype is: the same
    /// bits as scaling the gradients before the update, without writing them again. Multiplying
    /// by 1 changes no result (a `−0` gradient gives the moments a `+0` either way).
    pub fn with_gradient_scale(self, scale: f64) -> Self {
        Self { grad_scale: scale as f32, ..self }
    }

    /// One element: `(θ, m, v)` after the update with gradient `g`: [`Self::moments`], then
    /// [`Self::parameter`] with the new moments.
    #[inline(always)]
    fn update(&self, theta: f32, m: f32, v: f32, g: f32) -> (f32, f32, f32) {
        let (m, v) = self.moments(m, v, g);
        (self.parameter(theta, m, v), m, v)
    }

    /// The moments `(m, v)` after a step with gradient `g`. Each line is one tensor op of the
    /// tensor version (candle's `affine` computes `x · mul + add` in the tensor's dtype);
    /// `cuda/adamw.cu` computes the same operations in the same order.
    #[inline(always)]
    pub(crate) fn moments(&self, m: f32, v: f32, g: f32) -> (f32, f32) {
        let g = g * self.grad_scale + 0.0;
        let m = (m * self.beta1 + 0.0) + (g * self.one_minus_beta1 + 0.0);
        let v = (v * self.beta2 + 0.0) + ((g * g) * self.one_minus_beta2 + 0.0);
        (m, v)
    }

    /// The parameter `θ` after a step whose new moments are `m`, `v`.
    #[inline(always)]
    pub(crate) fn parameter(&self, theta: f32, m: f32, v: f32) -> f32 {
        let update = (m * self.inv_bc1 + 0.0) / ((v * self.inv_bc2 + 0.0).sqrt() * 1.0 + self.eps);
        (theta * self.decay + 0.0) - (update * self.lr + 0.0)
    }
}

/// Updates the CPU `f32` parameter `theta` in place with gradient `grad` and the moments `m`, `v`
/// (flat, one per element of `theta`):
///
/// ```text
/// m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
/// θ ← (1 − lr·λ) θ − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
/// ```
///
/// With `rows = Some((rows, dim))` the gradient holds only those rows (of `dim` elements) of the
/// parameter, in order (a row-sparse embedding gradient): only they are updated. Sizes that do not
/// match and rows out of range are errors.
pub fn adamw_update_in_place(
    theta: &Tensor,
    grad: &Tensor,
    m: &mut [f32],
    v: &mut [f32],
    rows: Option<(&[u32], usize)>,
    coefficients: AdamWCoefficients,
) -> Result<()> {
    let op = FusedUpdate { coefficients, m: Mutex::new(m), v: Mutex::new(v), rows };
    theta.inplace_op2(&grad.contiguous()?, &op)
}

/// The in-place op of [`adamw_update_in_place`].
struct FusedUpdate<'a> {
    coefficients: AdamWCoefficients,
    m: Mutex<&'a mut [f32]>,
    v: Mutex<&'a mut [f32]>,
    rows: Option<(&'a [u32], usize)>,
}

impl InplaceOp2 for FusedUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-fused-update"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(grad)) = (s1, s2) else {
            candle_core::bail!("adamw-fused-update: f32 only");
        };
        let theta = contiguous_mut(theta, l1, "adamw-fused-update: parameter")?;
        let grad = contiguous(grad, l2, "adamw-fused-update: gradient")?;
        let mut m = self.m.lock().expect("lock poisoned");
        let mut v = self.v.lock().expect("lock poisoned");
        if m.len() != theta.len() || v.len() != theta.len() {
            candle_core::bail!(
                "adamw-fused-update: moments of {} and {} for {} elements",
                m.len(),
                v.len(),
                theta.len()
            );
        }
        let c = self.coefficients;
        let apply = |theta: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32]| {
            for (((t, m), v), &g) in theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(grad) {
                (*t, *m, *v) = c.update(*t, *m, *v, g);
            }
        };
        match self.rows {
            None => {
                if theta.len() != grad.len() {
                    candle_core::bail!("adamw-fused-update: sizes differ");
                }
                const CHUNK: usize = 1 << 16;
                theta
                    .par_chunks_mut(CHUNK)
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .zip(grad.par_chunks(CHUNK))
                    .for_each(|(((t, m), v), g)| apply(t, m, v, g));
            }
            Some((rows, dim)) => {
                if grad.len() != rows.len() * dim {
                    candle_core::bail!("adamw-fused-update: row gradient size differs");
                }
                // Every row checked before any is written: a bad one changes nothing.
                let n = l1.dims().first().copied().unwrap_or(1);
                crate::overwrite_rows::check_distinct_rows(rows, n, "adamw-fused-update")?;
                for (k, &r) in rows.iter().enumerate() {
                    let at = r as usize * dim..(r as usize + 1) * dim;
                    apply(&mut theta[at.clone()], &mut m[at.clone()], &mut v[at], &grad[k * dim..(k + 1) * dim]);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::oracle::values;

    /// Three steps on a `[3, 4]` parameter (dense, then rows 2 and 0 only) against the formula in
    /// f64.
    #[test]
    fn matches_the_adamw_formula_in_f64_dense_and_by_rows() {
        let (beta1, beta2, eps, decay) = (0.8, 0.9, 1e-6, 0.05);
        let init: Vec<f32> = values(1, 12).iter().map(|&x| x as f32).collect();
        let w = Var::from_tensor(&Tensor::from_slice(&init, (3, 4), &Device::Cpu).unwrap()).unwrap();
        let (mut m, mut v) = (vec![0f32; 12], vec![0f32; 12]);
        let (mut theta, mut m64, mut v64) =
            (init.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(), [0.0; 12], [0.0; 12]);
        for t in 1..=3 {
            let lr = 0.1 * t as f64;
            let rows: Option<Vec<u32>> = (t == 3).then(|| vec![2, 0]);
            let touched: Vec<usize> = match &rows {
                None => (0..12).collect(),
                Some(r) => r.iter().flat_map(|&r| r as usize * 4..r as usize * 4 + 4).collect(),
            };
            let g: Vec<f32> = values(10 + t as u64, touched.len()).iter().map(|&x| x as f32).collect();
            let grad = Tensor::from_slice(&g, g.len(), &Device::Cpu).unwrap();
            let k = AdamWCoefficients::new(beta1, beta2, eps, decay, lr, t);
            adamw_update_in_place(w.as_tensor(), &grad, &mut m, &mut v, rows.as_deref().map(|r| (r, 4)), k).unwrap();
            for (gi, &i) in g.iter().zip(&touched) {
                let g = f64::from(*gi);
                theta[i] *= 1.0 - lr * decay;
                m64[i] = beta1 * m64[i] + (1.0 - beta1) * g;
                v64[i] = beta2 * v64[i] + (1.0 - beta2) * g * g;
                let (mh, vh) = (m64[i] / (1.0 - beta1.powi(t)), v64[i] / (1.0 - beta2.powi(t)));
                theta[i] -= lr * mh / (vh.sqrt() + eps);
            }
            let got = w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in 0..12 {
                assert!((f64::from(got[i]) - theta[i]).abs() <= 1e-6 * (1.0 + theta[i].abs()), "step {t}, element {i}");
            }
        }
        let k = AdamWCoefficients::new(beta1, beta2, eps, decay, 0.1, 4);
        let g = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = adamw_update_in_place(w.as_tensor(), &g, &mut m, &mut v, Some((&[3], 4)), k).unwrap_err();
        assert!(e.to_string().contains("row 3 is out of range"), "{e}");
    }
}
