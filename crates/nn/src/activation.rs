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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn gelu_value_and_gradient_are_exact() {
        // gelu(1) = Φ(1) = 0.841344746068543; gelu'(1) = Φ(1) + φ(1) = 0.841344746068543 + 0.241970724519143.
        let x = Var::new(&[1f64, -2.0], &Device::Cpu).unwrap();
        let y = Activation::Gelu.apply(x.as_tensor()).unwrap();
        let v = y.to_vec1::<f64>().unwrap();
        assert!((v[0] - 0.841_344_746_068_543).abs() < 1e-15, "{v:?}");
        // gelu(−2) = −2 Φ(−2) = −2 · 0.022750131948179
        assert!((v[1] + 0.045_500_263_896_358).abs() < 1e-15, "{v:?}");
        let g = y.sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        assert!((g[0] - 1.083_315_470_587_686).abs() < 1e-14, "{g:?}");
        // gelu'(−2) = Φ(−2) − 2 φ(−2) = 0.022750131948179 − 2 · 0.053990966513188
        assert!((g[1] + 0.085_231_801_078_197).abs() < 1e-14, "{g:?}");
    }
}
