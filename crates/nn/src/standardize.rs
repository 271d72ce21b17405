//! The tail every normalisation layer shares: standardise, then scale and shift.

use candle_core::{Result, Tensor};

/// `centred / √(var + eps) · weight + bias`, broadcasting `var`, `weight` and `bias` over
/// `centred` (each affine parameter optional): LayerNorm and BatchNorm after they have computed
/// their statistics over their own axes.
pub(crate) fn standardize(
    centred: &Tensor,
    var: &Tensor,
    eps: f64,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let mut y = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}
