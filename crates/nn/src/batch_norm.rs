//! BatchNorm over the feature dimension of a `[batch, features]` matrix, with running statistics.

use candle_core::{ModuleT, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::host_transfer::{upload, Origin};
use crate::Error;

/// BatchNorm options (PyTorch `BatchNorm1d` defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchNormConfig {
    /// Added to the variance before the square root.
    pub eps: f64,
    /// Weight of the newest batch in the running-statistics update, in `(0, 1]`:
    /// `running = (1 − momentum) · running + momentum · batch`. (PyTorch's cumulative-average mode,
    /// `momentum=None`, is not supported.)
    pub momentum: f64,
    /// Learnable per-feature scale `weight` (init 1) and shift `bias` (init 0).
    pub affine: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self { eps: 1e-5, momentum: 0.1, affine: true }
    }
}

/// `y = (x − μ) / sqrt(σ² + eps) · weight + bias` per feature (column) of a `[batch, features]`
/// input, as `torch.nn.BatchNorm1d` with `track_running_stats=True`.
///
/// - **Training** (`forward_t(x, true)`): `μ`, `σ²` are the batch mean and the biased batch
///   variance; the running statistics are then updated in place with the *unbiased* variance,
///   `running_var ← (1 − m)·running_var + m·σ²·B/(B − 1)`, `running_mean ← (1 − m)·running_mean + m·μ`,
///   and `num_batches_tracked` is incremented, exactly as PyTorch. A batch of one row is an error
///   (the variance is undefined), as in PyTorch.
/// - **Evaluation** (`forward_t(x, false)` or [`BatchNorm::forward`]): `μ`, `σ²` are the running
///   statistics.
///
/// Written with differentiable candle primitives (candle's fused norms have no backward pass).
///
/// **Parameters vs buffers.** `weight` and `bias` are trainable and live in the [`VarBuilder`]'s
/// store. The running statistics are *buffers*: `running_mean` `[features]` (init 0),
/// `running_var` `[features]` (init 1) and `num_batches_tracked` (a scalar `i64`, init 0). They are
/// kept outside the parameter store, so optimisers and gradient checks never see them; read or
/// restore them (to save them with the weights) through [`BatchNorm::buffers`], whose names are the
/// builder's prefix plus PyTorch's buffer names, so a PyTorch `state_dict` loads directly.
///
/// ```
/// # use candle_core::{Device, DType, ModuleT, Tensor};
/// # use rankstack_nn::{BatchNorm, BatchNormConfig, SeededVarMap};
/// let params = SeededVarMap::new(0);
/// let bn = BatchNorm::new(2, BatchNormConfig::default(), params.var_builder(DType::F32, &Device::Cpu).pp("bn"))?;
/// let x = Tensor::new(&[[1f32, 10.], [3., 30.]], &Device::Cpu)?;
/// let y = bn.forward_t(&x, true)?; // batch statistics; running statistics move towards them
/// assert_eq!(y.dims(), &[2, 2]);
/// let names: Vec<String> = bn.buffers().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    prefix: String,
    num_features: usize,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// A BatchNorm over `num_features` columns.
    pub fn new(num_features: usize, config: BatchNormConfig, vb: VarBuilder) -> crate::Result<Self> {
        if num_features == 0 {
            return Err(Error::config("BatchNorm", "num_features", "must be > 0"));
        }
        if !(config.eps.is_finite() && config.eps > 0.0) {
            return Err(Error::config("BatchNorm", "eps", format!("must be finite and > 0, got {}", config.eps)));
        }
        if !(config.momentum > 0.0 && config.momentum <= 1.0) {
            return Err(Error::config("BatchNorm", "momentum", format!("must be in (0, 1], got {}", config.momentum)));
        }
        let (weight, bias) = if config.affine {
            (
                Some(vb.get_with_hints(num_features, "weight", Init::Const(1.0))?),
                Some(vb.get_with_hints(num_features, "bias", Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        let (dtype, dev) = (vb.dtype(), vb.device());
        let prefix = vb.prefix();
        Ok(Self {
            weight,
            bias,
            running_mean: Var::zeros(num_features, dtype, dev)?,
            running_var: Var::ones(num_features, dtype, dev)?,
            num_batches_tracked: Var::from_tensor(&upload(vec![0i64], (), dev, "batch counter", Origin::State)?)?,
            prefix,
            num_features,
            eps: config.eps,
            momentum: config.momentum,
        })
    }

    /// Number of features (columns).
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// The running mean `[features]`.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The running (unbiased) variance `[features]`.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// The buffers, by full name (`<prefix>.running_mean`, `<prefix>.running_var`,
    /// `<prefix>.num_batches_tracked`), for saving with the weights and for
    /// [`crate::checkpoint::load_into`]. Setting these [`Var`]s changes the layer.
    pub fn buffers(&self) -> Vec<(String, Var)> {
        let name = |n: &str| if self.prefix.is_empty() { n.to_string() } else { format!("{}.{n}", self.prefix) };
        vec![
            (name("running_mean"), self.running_mean.clone()),
            (name("running_var"), self.running_var.clone()),
            (name("num_batches_tracked"), self.num_batches_tracked.clone()),
        ]
    }

    fn update_running_stats(&self, mean: &Tensor, biased_var: &Tensor, batch: usize) -> Result<()> {
        let m = self.momentum;
        let unbiased = (biased_var.detach() * (batch as f64 / (batch - 1) as f64))?;
        let new_mean = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean.detach() * m)?)?;
        let new_var = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)?;
        // Counted on the device: reading the count back would make a GPU wait at every step.
        self.num_batches_tracked.set(&self.num_batches_tracked.as_tensor().affine(1.0, 1.0)?)
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let batch = crate::shape::expect_matrix("BatchNorm", "input", x, self.num_features)?;
        let (centred, var) = if train {
            if batch < 2 {
                return Err(Error::input(
                    "BatchNorm",
                    "input",
                    format!("training needs more than one row per batch to estimate a variance, got {batch}"),
                )
                .into());
            }
            let mean = x.mean_keepdim(0)?;
            let centred = x.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(0)?;
            self.update_running_stats(&mean.squeeze(0)?, &var.squeeze(0)?, batch)?;
            (centred, var)
        } else {
            // Copies, so a later running-statistics update cannot alias a graph built here.
            let mean = self.running_mean.as_tensor().detach().copy()?.unsqueeze(0)?;
            let var = self.running_var.as_tensor().detach().copy()?.unsqueeze(0)?;
            (x.broadcast_sub(&mean)?, var)
        };
        crate::standardize::standardize(&centred, &var, self.eps, self.weight.as_ref(), self.bias.as_ref())
    }
}

impl BatchNorm {
    /// Evaluation-mode forward pass (running statistics, nothing updated).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeededVarMap;
    use candle_core::{DType, Device};

    fn v1(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn training_uses_batch_stats_and_updates_running_stats_like_pytorch() {
        // Column [1, 3]: mean 2, biased var 1, unbiased var 2. Momentum 0.5:
        // running_mean = 0.5·0 + 0.5·2 = 1, running_var = 0.5·1 + 0.5·2 = 1.5.
        let m = SeededVarMap::new(0);
        let cfg = BatchNormConfig { eps: 1e-12, momentum: 0.5, affine: true };
        let bn = BatchNorm::new(1, cfg, m.var_builder(DType::F64, &Device::Cpu)).unwrap();
        let x = Tensor::new(&[[1f64], [3.0]], &Device::Cpu).unwrap();
        let y: Vec<Vec<f64>> = bn.forward_t(&x, true).unwrap().to_vec2().unwrap();
        assert!((y[0][0] + 1.0).abs() < 1e-9 && (y[1][0] - 1.0).abs() < 1e-9, "{y:?}");
        assert_eq!(v1(bn.running_mean()), vec![1.0]);
        assert_eq!(v1(bn.running_var()), vec![1.5]);
        assert_eq!(bn.buffers()[2].1.as_tensor().to_scalar::<i64>().unwrap(), 1);
        // Evaluation uses the running statistics: (3 − 1) / sqrt(1.5).
        let y: Vec<Vec<f64>> = bn.forward(&Tensor::new(&[[3f64]], &Device::Cpu).unwrap()).unwrap().to_vec2().unwrap();
        assert!((y[0][0] - 2.0 / 1.5f64.sqrt()).abs() < 1e-9);
        assert_eq!(v1(bn.running_mean()), vec![1.0], "eval must not update");
    }

    #[test]
    fn buffers_are_not_parameters_and_params_get_gradients() {
        let m = SeededVarMap::new(0);
        let bn =
            BatchNorm::new(3, BatchNormConfig::default(), m.var_builder(DType::F32, &Device::Cpu).pp("bn")).unwrap();
        let names: Vec<String> = m.named_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["bn.bias", "bn.weight"]);
        let x = Tensor::new(&[[1f32, 2., 4.], [0., -1., 3.], [2., 2., 2.]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[[1f32, -2., 0.5], [0.3, 0.1, -1.], [2., 1., 1.]], &Device::Cpu).unwrap();
        let loss = (bn.forward_t(&x, true).unwrap() * w).unwrap().sum_all().unwrap();
        crate::testing::assert_all_params_get_gradients(&m, &loss.backward().unwrap());
    }

    #[test]
    fn bad_configs_and_inputs_are_errors() {
        let m = SeededVarMap::new(0);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        let bad = |c: BatchNormConfig| BatchNorm::new(2, c, vb.clone()).unwrap_err().to_string();
        assert!(bad(BatchNormConfig { momentum: 0.0, ..Default::default() }).contains("momentum"));
        assert!(bad(BatchNormConfig { eps: -1.0, ..Default::default() }).contains("eps"));
        assert!(BatchNorm::new(0, BatchNormConfig::default(), vb.clone())
            .unwrap_err()
            .to_string()
            .contains("num_features"));
        let bn = BatchNorm::new(2, BatchNormConfig::default(), vb).unwrap();
        let one_row = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(bn.forward_t(&one_row, true).unwrap_err().to_string().contains("more than one row"));
        assert!(bn.forward_t(&one_row, false).is_ok());
        let err = bn.forward(&Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(err.contains("BatchNorm") && err.contains("[batch, 2]") && err.contains("[4, 3]"), "{err}");
    }
}
