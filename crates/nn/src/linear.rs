//! Linear layers with the workspace's default initialisation.

use candle_nn::{Init, VarBuilder};

pub use candle_nn::Linear;

/// A `y = x Wᵀ + b` layer with PyTorch-layout parameters `weight` `[out, in]` and `bias` `[out]`,
/// Xavier-normal weight and zero bias.
pub fn linear_xavier(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", crate::init::xavier_normal(in_dim, out_dim))?;
    let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?) } else { None };
    Ok(Linear::new(weight, bias))
}
