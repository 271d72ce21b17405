//! Activation functions selectable from configs.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// An element-wise activation. Serialised in snake case (`"relu"`, `"tanh"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `max(x, 0)`.
    #[default]
    Relu,
    /// `tanh(x)`.
    Tanh,
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// GELU, exact erf form (PyTorch's default `approximate="none"`).
    Gelu,
    /// `x`.
    Identity,
}

impl Activation {
    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::Tanh => x.tanh(),
            Self::Sigmoid => crate::loss::sigmoid(x),
            Self::Gelu => gelu_erf(x),
            Self::Identity => Ok(x.clone()),
        }
    }
}

/// `x · Φ(x) = x · (1 + erf(x / √2)) / 2`, composed of `erf` and arithmetic so that the gradient is
/// exact: candle's fused `gelu_erf` backward pass uses `0.398942` for `1/√(2π)`, a relative error
/// of about 7e-7 in the gradient (visible against PyTorch in float64).
fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let cdf = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
    x * cdf?
}

impl candle_core::Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x)
    }
}
