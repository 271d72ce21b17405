//! Multi-layer perceptron.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::{
    linear_xavier, Activation, BatchNorm, BatchNormConfig, Dropout, Error, LayerNorm, LayerNormConfig, Linear,
};

/// Normalisation applied after each linear layer of an [`Mlp`], before the activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// No normalisation.
    #[default]
    None,
    /// [`LayerNorm`] with PyTorch defaults.
    LayerNorm,
    /// [`BatchNorm`] with PyTorch defaults (batch statistics in training, running statistics in
    /// evaluation; the running statistics are buffers, see [`Mlp::buffers`]).
    BatchNorm,
}

/// Configuration of an [`Mlp`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Output width of each linear layer, in order (the last one is the MLP's output width).
    pub dims: Vec<usize>,
    /// Activation after each layer.
    #[serde(default)]
    pub activation: Activation,
    /// Whether the last layer is also normalised, activated and dropped out (true for a hidden
    /// stack feeding other layers; false for a stack ending in logits).
    #[serde(default = "default_true")]
    pub activate_last: bool,
    /// Normalisation after each linear layer.
    #[serde(default)]
    pub normalization: Normalization,
    /// Dropout probability after each activation, in training only.
    #[serde(default)]
    pub dropout: f64,
}

fn default_true() -> bool {
    true
}

impl MlpConfig {
    /// A ReLU MLP with the given layer widths, no normalisation and no dropout.
    pub fn relu(dims: impl Into<Vec<usize>>) -> Self {
        Self {
            dims: dims.into(),
            activation: Activation::Relu,
            activate_last: true,
            normalization: Normalization::None,
            dropout: 0.0,
        }
    }
}

#[derive(Debug)]
enum Norm {
    Layer(LayerNorm),
    Batch(BatchNorm),
}

#[derive(Debug)]
struct MlpLayer {
    linear: Linear,
    norm: Option<Norm>,
    activate: bool,
}

/// `x ↦ (drop ∘ act ∘ norm ∘ linear)ₙ ∘ … ∘ (drop ∘ act ∘ norm ∘ linear)₁ (x)`.
///
/// Parameters: `layers.{i}.weight` `[dims[i], in_i]`, `layers.{i}.bias` `[dims[i]]` (Xavier-normal
/// weights, zero biases) and, with LayerNorm or BatchNorm, `norms.{i}.weight` / `norms.{i}.bias`
/// (BatchNorm's running statistics are buffers, listed by [`Mlp::buffers`]).
///
/// ```
/// # use candle_core::{Device, DType, Module, Tensor};
/// # use rankstack_nn::{Mlp, MlpConfig, SeededVarMap};
/// let params = SeededVarMap::new(0);
/// let mlp = Mlp::new(8, &MlpConfig::relu([16, 4]), params.var_builder(DType::F32, &Device::Cpu))?;
/// let y = mlp.forward(&Tensor::zeros((2, 8), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), &[2, 4]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Mlp {
    layers: Vec<MlpLayer>,
    activation: Activation,
    dropout: Dropout,
    input_dim: usize,
}

impl Mlp {
    /// An MLP reading `input_dim` features.
    pub fn new(input_dim: usize, config: &MlpConfig, vb: VarBuilder) -> crate::Result<Self> {
        if input_dim == 0 {
            return Err(Error::config("Mlp", "input_dim", "must be > 0"));
        }
        if config.dims.is_empty() {
            return Err(Error::config("Mlp", "dims", "needs at least one layer"));
        }
        if let Some(i) = config.dims.iter().position(|&d| d == 0) {
            return Err(Error::config("Mlp", format!("dims[{i}]"), "must be > 0"));
        }
        // Seed dropout from the parameter path so that sibling MLPs draw different masks.
        let dropout = Dropout::new(config.dropout, crate::rng::hash_name(&vb.prefix()))
            .map_err(|_| Error::config("Mlp", "dropout", format!("must be in [0, 1), got {}", config.dropout)))?;
        let mut layers = Vec::with_capacity(config.dims.len());
        let mut in_dim = input_dim;
        for (i, &out_dim) in config.dims.iter().enumerate() {
            let is_last = i + 1 == config.dims.len();
            let activate = !is_last || config.activate_last;
            let linear = linear_xavier(in_dim, out_dim, true, vb.pp("layers").pp(i))?;
            let norm = match (config.normalization, activate) {
                (Normalization::LayerNorm, true) => {
                    Some(Norm::Layer(LayerNorm::new(out_dim, LayerNormConfig::default(), vb.pp("norms").pp(i))?))
                }
                (Normalization::BatchNorm, true) => {
                    Some(Norm::Batch(BatchNorm::new(out_dim, BatchNormConfig::default(), vb.pp("norms").pp(i))?))
                }
                _ => None,
            };
            layers.push(MlpLayer { linear, norm, activate });
            in_dim = out_dim;
        }
        Ok(Self { layers, activation: config.activation, dropout, input_dim })
    }

    /// The dropout applied after each activation.
    pub fn dropout(&self) -> &Dropout {
        &self.dropout
    }

    /// Input width.
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// Non-trainable state (BatchNorm running statistics) by full name; empty without BatchNorm.
    pub fn buffers(&self) -> Vec<(String, candle_core::Var)> {
        self.layers
            .iter()
            .filter_map(|l| match &l.norm {
                Some(Norm::Batch(bn)) => Some(bn.buffers()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Output width.
    pub fn output_dim(&self) -> usize {
        self.layers.last().map(|l| l.linear.out_dim()).unwrap_or(0)
    }
}

impl crate::LinearLayers for Mlp {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        self.layers.iter_mut().map(|l| &mut l.linear).collect()
    }
}

impl ModuleT for Mlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        crate::shape::expect_matrix("Mlp", "input", x, self.input_dim)?;
        let mut h = x.clone();
        for layer in &self.layers {
            h = match (&layer.norm, layer.activate) {
                // Unnormalised: the activation is part of the product's node (Linear::forward_activated).
                (None, true) => layer.linear.forward_activated(&h, self.activation)?,
                (norm, activate) => {
                    h = layer.linear.forward(&h)?;
                    match norm {
                        Some(Norm::Layer(norm)) => h = norm.forward(&h)?,
                        Some(Norm::Batch(norm)) => h = norm.forward_t(&h, train)?,
                        None => {}
                    }
                    if activate {
                        self.activation.apply(&h)?
                    } else {
                        h
                    }
                }
            };
            if layer.activate {
                h = self.dropout.forward_t(&h, train)?;
            }
        }
        Ok(h)
    }
}

impl Mlp {
    /// Evaluation-mode forward pass (no dropout).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeededVarMap;
    use candle_core::{DType, Device};

    #[test]
    fn constant_weights_by_hand() {
        // One layer 2 -> 1 with weight [1, -2], bias 0.5: x = [3, 1] gives 3 - 2 + 0.5 = 1.5, relu 1.5;
        // x = [0, 1] gives -1.5, relu 0.
        let m = SeededVarMap::new(0);
        let mlp = Mlp::new(2, &MlpConfig::relu([1]), m.var_builder(DType::F32, &Device::Cpu)).unwrap();
        for (name, var) in m.named_vars() {
            let v = if name.ends_with("weight") {
                Tensor::new(&[[1f32, -2.0]], &Device::Cpu)
            } else {
                Tensor::new(&[0.5f32], &Device::Cpu)
            };
            var.set(&v.unwrap()).unwrap();
        }
        let y: Vec<Vec<f32>> =
            mlp.forward(&Tensor::new(&[[3f32, 1.0], [0.0, 1.0]], &Device::Cpu).unwrap()).unwrap().to_vec2().unwrap();
        assert_eq!(y, vec![vec![1.5], vec![0.0]]);
    }

    #[test]
    fn invalid_configs_and_inputs_are_errors() {
        let m = SeededVarMap::new(0);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        assert!(Mlp::new(2, &MlpConfig::relu(Vec::new()), vb.clone()).unwrap_err().to_string().contains("dims"));
        assert!(Mlp::new(2, &MlpConfig::relu([3, 0]), vb.clone()).unwrap_err().to_string().contains("dims[1]"));
        let mut c = MlpConfig::relu([3]);
        c.dropout = 1.5;
        assert!(Mlp::new(2, &c, vb.clone()).unwrap_err().to_string().contains("dropout"));
        let mlp = Mlp::new(2, &MlpConfig::relu([3]), vb).unwrap();
        let err = mlp.forward(&Tensor::zeros((4, 5), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(err.contains("Mlp") && err.contains("[batch, 2]") && err.contains("[4, 5]"), "{err}");
    }

    #[test]
    fn batch_norm_option_trains_and_exposes_buffers() {
        let m = SeededVarMap::new(0);
        let mut c = MlpConfig::relu([4, 2]);
        c.normalization = Normalization::BatchNorm;
        let mlp = Mlp::new(3, &c, m.var_builder(DType::F32, &Device::Cpu)).unwrap();
        let names: Vec<String> = mlp.buffers().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[0], "norms.0.running_mean");
        assert_eq!(names.len(), 6);
        let x = Tensor::new(&[[1f32, 2., 3.], [-1., 0.5, 2.], [0., 0., 1.], [2., -2., 0.]], &Device::Cpu).unwrap();
        let before = mlp.buffers()[0].1.as_tensor().to_vec1::<f32>().unwrap();
        let y = mlp.forward_t(&x, true).unwrap();
        assert_ne!(before, mlp.buffers()[0].1.as_tensor().to_vec1::<f32>().unwrap());
        let w = Tensor::new(&[[1f32, -1.], [0.5, 2.], [-0.3, 1.], [2., 0.1]], &Device::Cpu).unwrap();
        let loss = (y * w).unwrap().sum_all().unwrap();
        crate::testing::assert_all_params_get_gradients(&m, &loss.backward().unwrap());
        assert_eq!(serde_json::from_str::<Normalization>("\"batch_norm\"").unwrap(), Normalization::BatchNorm);
    }
}
