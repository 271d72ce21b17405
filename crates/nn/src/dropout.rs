//! Seeded dropout.

use std::sync::{Arc, Mutex};

use rankstack_kernels::cpu::scale_by_mask::scale_by_mask;

use candle_core::{ModuleT, Result, Tensor};

use crate::rng::Rng;

/// Inverted dropout: in training each element is zeroed with probability `p` and the survivors are
/// scaled by `1 / (1 − p)`; in evaluation it is the identity.
///
/// On the CPU the mask comes from this layer's own [`Rng`] (candle's CPU RNG cannot be seeded), so
/// a training run is reproducible; [`Dropout::rng_state`] / [`Dropout::set_rng_state`] let a
/// trainer checkpoint it. On the CPU (f32/f64) the product is one fused op whose backward pass
/// reuses the mask. On a GPU the mask is drawn there ([`device_mask`]), by the device's generator:
/// drawing tens of millions of values a step on the host and copying them over would cost more
/// than the step. Seed the device (`Device::set_seed`, as the trainer does every step) for a
/// reproducible run; its masks differ from the CPU's.
#[derive(Debug)]
pub struct Dropout {
    p: f64,
    rng: Mutex<Rng>,
}

impl Dropout {
    /// Dropout with probability `p ∈ [0, 1)`, drawing masks from a stream seeded by `seed`.
    pub fn new(p: f64, seed: u64) -> crate::Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(crate::Error::config("Dropout", "p", format!("must be in [0, 1), got {p}")));
        }
        Ok(Self { p, rng: Mutex::new(Rng::new(seed)) })
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }

    /// The mask generator's state.
    pub fn rng_state(&self) -> [u64; 4] {
        self.rng.lock().expect("dropout rng lock poisoned").state()
    }

    /// Restores a state from [`Dropout::rng_state`].
    pub fn set_rng_state(&self, state: [u64; 4]) {
        *self.rng.lock().expect("dropout rng lock poisoned") = Rng::from_state(state);
    }

    /// The multipliers of one training call over `n` elements (`0` drop, `1 / (1 − p)` keep, as
    /// f32), one uniform draw per element from this layer's stream, in order. Fused kernels that
    /// apply dropout inside (packed attention) draw their masks here.
    ///
    /// The draws are serial (tens of millions per `homefeed-bench` training step). Drawing blocks in
    /// parallel from per-block seeds would be faster; it was tried while `tests/learning.rs` still
    /// depended on the exact masks (it no longer does) and is a possible next step.
    pub fn multipliers(&self, n: usize) -> Vec<f32> {
        let keep_scale = (1.0 / (1.0 - self.p)) as f32;
        let mut rng = self.rng.lock().expect("dropout rng lock poisoned");
        (0..n).map(|_| if rng.uniform() < self.p { 0.0 } else { keep_scale }).collect()
    }
}

/// The dropout multipliers for `like` (its shape, dtype and device) drawn on its device: `0` with
/// probability `p`, `1 / (1 − p)` otherwise, from the device's random generator.
pub fn device_mask(p: f64, like: &Tensor) -> Result<Tensor> {
    device_multipliers(&device_keep_mask(p, like.shape(), like.device())?, p, like.dtype())
}

/// Which elements of a tensor of `shape` on `device` dropout keeps (`u8`: 1 keep, 0 drop, drawn
/// with probability `1 − p` of keeping by the device's random generator): a quarter of
/// [`device_mask`]'s memory where the mask has to be kept (the recomputed attention keeps it for
/// its backward pass). [`device_multipliers`] turns it into the mask.
pub fn device_keep_mask(p: f64, shape: &candle_core::Shape, device: &candle_core::Device) -> Result<Tensor> {
    Tensor::rand(0f32, 1f32, shape, device)?.ge(p)
}

/// The dropout multipliers (`0` or `1 / (1 − p)`, in `dtype`) of a keep mask from
/// [`device_keep_mask`]; the same values as [`device_mask`].
pub fn device_multipliers(keep: &Tensor, p: f64, dtype: candle_core::DType) -> Result<Tensor> {
    keep.to_dtype(dtype)?.affine(1.0 / (1.0 - p), 0.0)
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        if !x.device().is_cpu() {
            return x.mul(&device_mask(self.p, x)?);
        }
        let mask = Arc::new(self.multipliers(x.elem_count()));
        // f32/f64: one fused pass whose backward pass reuses the mask.
        if let Some(y) = scale_by_mask(x, mask.clone())? {
            return Ok(y);
        }
        let mask = Arc::try_unwrap(mask).unwrap_or_else(|m| m.as_ref().clone());
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn eval_is_identity_train_is_reproducible_and_unbiased() {
        let x = Tensor::ones((100, 100), DType::F32, &Device::Cpu).unwrap();
        let d = Dropout::new(0.25, 9).unwrap();
        assert_eq!(d.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
        let state = d.rng_state();
        let a = d.forward_t(&x, true).unwrap();
        d.set_rng_state(state);
        let b = d.forward_t(&x, true).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        let mean = a.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        assert!(Dropout::new(1.0, 0).is_err() && Dropout::new(-0.1, 0).is_err() && Dropout::new(f64::NAN, 0).is_err());
    }

    #[test]
    fn gradient_is_the_mask() {
        // The fused op's gradient is the multiplier of each element.
        let n = 100_003;
        for dtype in [DType::F32, DType::F64] {
            let x = candle_core::Var::from_tensor(&crate::testing::seeded_randn(4, &[n], dtype)).unwrap();
            let d = Dropout::new(0.5, 3).unwrap();
            let y = d.forward_t(x.as_tensor(), true).unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            let g: Vec<f64> = g.get(x.as_tensor()).unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
            let xs: Vec<f64> = x.as_tensor().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
            let ys: Vec<f64> = y.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
            assert!(g.iter().all(|&m| m == 0.0 || m == 2.0));
            for ((x, y), m) in xs.iter().zip(&ys).zip(&g) {
                assert_eq!(*y, x * m);
            }
            let kept = g.iter().filter(|&&m| m > 0.0).count() as f64 / n as f64;
            assert!((kept - 0.5).abs() < 0.01, "kept {kept}");
        }
        // Off the fused path (bf16) the same multipliers apply.
        let d = Dropout::new(0.5, 3).unwrap();
        let state = d.rng_state();
        let ones = Tensor::ones(100, DType::F32, &Device::Cpu).unwrap();
        let a: Vec<f32> = d.forward_t(&ones, true).unwrap().to_vec1().unwrap();
        d.set_rng_state(state);
        let b = d.forward_t(&ones.to_dtype(DType::BF16).unwrap(), true).unwrap();
        assert_eq!(a, b.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap());
    }
}
