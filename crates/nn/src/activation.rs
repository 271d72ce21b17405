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
            Self::Gelu => x.gelu_erf(),
            Self::Identity => Ok(x.clone()),
        }
    }
}

impl candle_core::Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x)
    }
}
