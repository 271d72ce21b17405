//! L2 normalisation of feature blocks.

use candle_core::{Result, Tensor, D};

/// `x / max(‖x‖₂, eps)` along the last dimension, as PyTorch's `F.normalize(x, dim=-1, eps=eps)`.
///
/// Computed as `x / sqrt(max(Σx², eps²))`, which has the same value and the same gradient wherever
/// `‖x‖ ≠ eps`, and unlike `max(sqrt(Σx²), eps)` has a finite gradient at `x = 0` (an empty bag):
/// `sqrt`'s derivative at 0 is infinite, and `∞ · 0` would turn the gradient of the embedding table
/// into NaN.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let y = feature_encoders::l2_normalize(&Tensor::new(&[[3f32, 4.], [0., 0.]], &Device::Cpu)?, 1e-12)?;
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![0.6, 0.8], vec![0., 0.]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn l2_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let sq = x.sqr()?.sum_keepdim(D::Minus1)?.maximum(eps * eps)?;
    x.broadcast_div(&sq.sqrt()?)
}
