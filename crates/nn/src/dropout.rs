//! Seeded dropout.

use std::sync::Mutex;

use candle_core::{ModuleT, Result, Tensor};

use crate::rng::Rng;

/// Inverted dropout: in training each element is zeroed with probability `p` and the survivors are
/// scaled by `1 / (1 − p)`; in evaluation it is the identity.
///
/// The mask comes from this layer's own [`Rng`] (candle's CPU RNG cannot be seeded), so a training
/// run is reproducible; [`Dropout::rng_state`] / [`Dropout::set_rng_state`] let a trainer checkpoint
/// it.
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
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep_scale = 1.0 / (1.0 - self.p);
        let n = x.elem_count();
        let mask: Vec<f32> = {
            let mut rng = self.rng.lock().expect("dropout rng lock poisoned");
            (0..n).map(|_| if rng.uniform() < self.p { 0.0 } else { keep_scale as f32 }).collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
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
}
