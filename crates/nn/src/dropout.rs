//! Seeded dropout.

use std::sync::{Arc, Mutex};

use rankstack_kernels::cpu::kernels_run_on;
use rankstack_kernels::cpu::scale_by_mask::scale_by_mask;

use candle_core::{DType, ModuleT, Result, Tensor};

use crate::host_transfer::{upload, Origin};
use crate::recompute::with_backward;
use crate::rng::Rng;

/// Inverted dropout: in training each element is zeroed with probability `p` and the survivors are
/// scaled by `1 / (1 − p)`; in evaluation it is the identity.
///
/// On the CPU the mask comes from this layer's own [`Rng`] (candle's CPU RNG cannot be seeded), so
/// a training run is reproducible; [`Dropout::rng_state`] / [`Dropout::set_rng_state`] let a
/// trainer checkpoint it. On the CPU (f32/f64) the product is one fused op whose backward pass
/// reuses the mask. On a GPU the mask is drawn there ([`device_keep_mask`]), by the device's
/// generator: drawing tens of millions of values a step on the host and copying them over would
/// cost more than the step. Seed the device (`Device::set_seed`, as the trainer does every step)
/// for a reproducible run; its masks differ from the CPU's. Off the fused op (a GPU, bf16, or the
/// CPU with its kernels off) the product is one graph node that keeps the mask for the backward
/// pass as `u8` ([`drop_with_keep_mask`]), a quarter of a float mask.
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

    /// The keep mask (`u8`, see [`drop_with_keep_mask`]) of one training call over a tensor of
    /// `shape` on `device` off the fused CPU op (a GPU, bf16, or the CPU with its kernels off): on
    /// the CPU from this layer's stream, on a GPU from the device's generator
    /// ([`device_keep_mask`]). Nodes that apply this layer's dropout inside
    /// (`LayerNorm::forward_residual`, TransAct's feed-forward block) draw it here, as [`Dropout`]
    /// itself does, so their masks are the layer's own.
    pub fn draw_keep_mask(&self, shape: &candle_core::Shape, device: &candle_core::Device) -> Result<Tensor> {
        if device.is_cpu() {
            upload(self.keep_draws(shape.elem_count()), shape, device, "dropout keep mask", Origin::Random)
        } else {
            device_keep_mask(self.p, shape, device)
        }
    }

    /// Which of `n` elements one training call keeps (`1`) or drops (`0`), from this layer's
    /// stream: the draws of [`Dropout::multipliers`].
    fn keep_draws(&self, n: usize) -> Vec<u8> {
        let mut rng = self.rng.lock().expect("dropout rng lock poisoned");
        (0..n).map(|_| u8::from(rng.uniform() >= self.p)).collect()
    }
}

/// Which elements of a tensor of `shape` on `device` dropout keeps (`u8`: 1 keep, 0 drop, drawn
/// with probability `1 − p` of keeping by the device's random generator): a quarter of a float
/// mask's memory where the mask has to be kept for the backward pass. [`device_multipliers`]
/// turns it into the multipliers.
pub fn device_keep_mask(p: f64, shape: &candle_core::Shape, device: &candle_core::Device) -> Result<Tensor> {
    Tensor::rand(0f32, 1f32, shape, device)?.ge(p)
}

/// The dropout multipliers (`0` or `1 / (1 − p)`, in `dtype`) of a keep mask from
/// [`device_keep_mask`].
pub fn device_multipliers(keep: &Tensor, p: f64, dtype: candle_core::DType) -> Result<Tensor> {
    keep.to_dtype(dtype)?.affine(1.0 / (1.0 - p), 0.0)
}

/// `x ⊙ D` for the multipliers `D` of the keep mask `keep` (`u8`, `x`'s shape; see
/// [`device_multipliers`]). Where `x` takes part in a graph it is one node whose backward pass
/// (`∂x = ∂y ⊙ D`) forms `D` again from `keep`: the graph keeps the `u8` mask, not `D`.
pub fn drop_with_keep_mask(x: &Tensor, keep: &Tensor, p: f64) -> Result<Tensor> {
    if keep.shape() != x.shape() {
        candle_core::bail!("dropout: keep mask {:?} for input {:?}", keep.dims(), x.dims());
    }
    let kept = keep.clone();
    with_backward(
        &[x],
        |t| t[0].mul(&device_multipliers(keep, p, t[0].dtype())?),
        move |_, _, grad| Ok(vec![Some(grad.mul(&device_multipliers(&kept, p, grad.dtype())?)?)]),
    )
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep = if kernels_run_on(x.device()) && matches!(x.dtype(), DType::F32 | DType::F64) {
            // One fused pass whose backward pass reuses the multipliers.
            let multipliers = Arc::new(self.multipliers(x.elem_count()));
            if let Some(y) = scale_by_mask(x, multipliers.clone())? {
                return Ok(y);
            }
            let keep: Vec<u8> = multipliers.iter().map(|&m| u8::from(m != 0.0)).collect();
            upload(keep, x.shape(), x.device(), "dropout keep mask", Origin::Random)?
        } else {
            self.draw_keep_mask(x.shape(), x.device())?
        };
        drop_with_keep_mask(x, &keep, self.p)
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

    /// On the GPU's graph (here the CPU with its kernels off) dropout is one node keeping a `u8`
    /// mask: from the same stream state, the fused op's values and gradient bit for bit.
    #[test]
    fn the_keep_mask_node_equals_the_fused_op() {
        use rankstack_kernels::cpu::{with_isa, Isa};
        for dtype in [DType::F32, DType::F64] {
            let x = candle_core::Var::from_tensor(&crate::testing::seeded_randn(5, &[3, 1001], dtype)).unwrap();
            let w = crate::testing::seeded_randn(6, &[3, 1001], dtype);
            let d = Dropout::new(0.5, 11).unwrap();
            let state = d.rng_state();
            let run = |y: Tensor| {
                let g = y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
                let flat =
                    |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
                (flat(&y), flat(g.get(x.as_tensor()).unwrap()))
            };
            let fused = run(d.forward_t(x.as_tensor(), true).unwrap());
            d.set_rng_state(state);
            let node = run(with_isa(Isa::Candle, || d.forward_t(x.as_tensor(), true)).unwrap());
            assert_eq!(fused, node, "{dtype:?}");
            assert!(fused.0.contains(&0.0) && fused.0.iter().any(|&v| v != 0.0));
        }
        let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let e = drop_with_keep_mask(&x, &Tensor::ones(6, DType::U8, &Device::Cpu).unwrap(), 0.5).unwrap_err();
        assert!(e.to_string().contains("keep mask [6] for input [2, 3]"), "{e}");
    }
}
