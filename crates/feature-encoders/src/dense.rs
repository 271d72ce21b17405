//! The dense-feature pipeline: non-finite → 0, signed log1p, z-score, BatchNorm, clamp.

use candle_core::{ModuleT, Result, Tensor, Var};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use rankstack_nn::host_transfer::{upload, Origin};
use rankstack_nn::{BatchNorm, BatchNormConfig, Error};

const LAYER: &str = "DenseEncoder";

/// Options of the dense pipeline. Every step is applied to each column independently; the steps
/// run in the order of the fields. The default is non-finite → 0, signed log1p, BatchNorm, clamp ±5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DensePipelineConfig {
    /// Replace NaN and ±∞ by 0 (their gradient is 0).
    pub replace_non_finite: bool,
    /// `x ↦ sign(x) · ln(1 + |x|)`.
    pub signed_log1p: bool,
    /// `x ↦ (x − mean) / std` with per-column statistics fitted by [`DenseEncoder::fit`] (population
    /// standard deviation; a constant column gets std 1). The statistics are buffers saved with the
    /// weights (`dense.standardize_mean`, `dense.standardize_std`).
    pub standardize: bool,
    /// BatchNorm with running statistics (parameters `dense.batch_norm.weight` / `.bias`, buffers
    /// `dense.batch_norm.running_mean` / `.running_var` / `.num_batches_tracked`).
    pub batch_norm: bool,
    /// BatchNorm momentum, in `(0, 1]`.
    pub batch_norm_momentum: f64,
    /// BatchNorm epsilon, `> 0`.
    pub batch_norm_eps: f64,
    /// Clamp to `[−clamp_value, clamp_value]`.
    pub clamp: bool,
    /// The clamp bound, `> 0`.
    pub clamp_value: f64,
}

impl Default for DensePipelineConfig {
    fn default() -> Self {
        Self {
            replace_non_finite: true,
            signed_log1p: true,
            standardize: false,
            batch_norm: true,
            batch_norm_momentum: 0.1,
            batch_norm_eps: 1e-5,
            clamp: true,
            clamp_value: 5.0,
        }
    }
}

impl DensePipelineConfig {
    pub(crate) fn validate(&self) -> rankstack_nn::Result<()> {
        let field = |f: &str| format!("dense_pipeline.{f}");
        if !(self.batch_norm_momentum > 0.0 && self.batch_norm_momentum <= 1.0) {
            return Err(Error::config(
                "FeatureSchema",
                field("batch_norm_momentum"),
                format!("must be in (0, 1], got {}", self.batch_norm_momentum),
            ));
        }
        if !(self.batch_norm_eps.is_finite() && self.batch_norm_eps > 0.0) {
            return Err(Error::config(
                "FeatureSchema",
                field("batch_norm_eps"),
                format!("must be finite and > 0, got {}", self.batch_norm_eps),
            ));
        }
        if !(self.clamp_value.is_finite() && self.clamp_value > 0.0) {
            return Err(Error::config(
                "FeatureSchema",
                field("clamp_value"),
                format!("must be finite and > 0, got {}", self.clamp_value),
            ));
        }
        Ok(())
    }
}

/// Encodes the `[B, n]` dense matrix into `[B, n + k]`: the `n` transformed columns (input order),
/// then `k` missing-value indicator columns (0/1, for the features that asked for one, in input
/// order; they are not normalised).
///
/// Per column, with the steps that are switched on, in this order:
/// `x ← finite(x) ? x : 0`, `x ← sign(x)·ln(1+|x|)`, `x ← (x − μ_fit)/σ_fit`, `x ← BatchNorm(x)`,
/// `x ← clamp(x, −c, c)`.
///
/// ```
/// # use candle_core::{Device, DType, ModuleT, Tensor};
/// # use feature_encoders::{DenseEncoder, DensePipelineConfig};
/// # use rankstack_nn::SeededVarMap;
/// let params = SeededVarMap::new(0);
/// let enc = DenseEncoder::new(2, &[1], &DensePipelineConfig::default(), params.var_builder(DType::F32, &Device::Cpu).pp("dense"))?;
/// let y = enc.forward_t(&Tensor::new(&[[1f32, f32::NAN], [3., 4.]], &Device::Cpu)?, true)?;
/// assert_eq!(y.dims(), &[2, 3]); // two features + one missing indicator
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct DenseEncoder {
    num_features: usize,
    indicator_columns: Option<Tensor>,
    num_indicators: usize,
    config: DensePipelineConfig,
    batch_norm: Option<BatchNorm>,
    standardize: Option<(Var, Var)>,
    prefix: String,
}

impl DenseEncoder {
    /// A pipeline over `num_features` columns, adding indicator columns for the column indices in
    /// `indicator_columns`.
    pub fn new(
        num_features: usize,
        indicator_columns: &[usize],
        config: &DensePipelineConfig,
        vb: VarBuilder,
    ) -> rankstack_nn::Result<Self> {
        config.validate()?;
        if num_features == 0 {
            return Err(Error::config(LAYER, "num_features", "must be > 0"));
        }
        if let Some(&c) = indicator_columns.iter().find(|&&c| c >= num_features) {
            return Err(Error::config(
                LAYER,
                "indicator_columns",
                format!("column {c} is out of range for {num_features} features"),
            ));
        }
        let (dtype, dev) = (vb.dtype(), vb.device().clone());
        let batch_norm = if config.batch_norm {
            let bn = BatchNormConfig { eps: config.batch_norm_eps, momentum: config.batch_norm_momentum, affine: true };
            Some(BatchNorm::new(num_features, bn, vb.pp("batch_norm"))?)
        } else {
            None
        };
        let standardize = if config.standardize {
            Some((Var::zeros(num_features, dtype, &dev)?, Var::ones(num_features, dtype, &dev)?))
        } else {
            None
        };
        let num_indicators = indicator_columns.len();
        let indicator_columns = if indicator_columns.is_empty() {
            None
        } else {
            let idx: Vec<u32> = indicator_columns.iter().map(|&c| c as u32).collect();
            Some(upload(idx, num_indicators, &dev, "missing-value indicator columns", Origin::Constant)?)
        };
        Ok(Self {
            num_features,
            indicator_columns,
            num_indicators,
            config: config.clone(),
            batch_norm,
            standardize,
            prefix: vb.prefix(),
        })
    }

    /// Number of input columns.
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// Output width: input columns plus indicator columns.
    pub fn output_dim(&self) -> usize {
        self.num_features + self.num_indicators
    }

    /// The BatchNorm, if the pipeline has one.
    pub fn batch_norm(&self) -> Option<&BatchNorm> {
        self.batch_norm.as_ref()
    }

    /// Non-trainable state by full name: the fitted z-score statistics (`<prefix>.standardize_mean`,
    /// `<prefix>.standardize_std`) and the BatchNorm running statistics. Save them with the weights.
    pub fn buffers(&self) -> Vec<(String, Var)> {
        let name = |n: &str| if self.prefix.is_empty() { n.to_string() } else { format!("{}.{n}", self.prefix) };
        let mut out = Vec::new();
        if let Some((mean, std)) = &self.standardize {
            out.push((name("standardize_mean"), mean.clone()));
            out.push((name("standardize_std"), std.clone()));
        }
        if let Some(bn) = &self.batch_norm {
            out.extend(bn.buffers());
        }
        out
    }

    /// Steps before the fitted statistics: non-finite → 0 and signed log1p. Returns the values and
    /// the 0/1 (u8) finiteness mask.
    fn pre(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let finite = x.abs()?.lt(f64::INFINITY)?; // NaN compares false
        let mut x = x.clone();
        if self.config.replace_non_finite {
            x = finite.where_cond(&x, &x.zeros_like()?)?;
        }
        if self.config.signed_log1p {
            x = x.sign()?.mul(&(x.abs()? + 1.0)?.log()?)?;
        }
        Ok((x, finite))
    }

    /// Fits the z-score statistics (per-column mean and population standard deviation of the
    /// values after the non-finite and log steps; a column with std below 1e-12 gets std 1) on a
    /// `[N, n]` sample and stores them in the buffers. An error if `standardize` is off.
    pub fn fit(&self, data: &Tensor) -> rankstack_nn::Result<()> {
        let Some((mean_var, std_var)) = &self.standardize else {
            return Err(Error::config(LAYER, "standardize", "fit needs `dense_pipeline.standardize = true`"));
        };
        let n = rankstack_nn::shape::expect_matrix(LAYER, "fit data", data, self.num_features)?;
        if n == 0 {
            return Err(Error::input(LAYER, "fit data", "needs at least one row"));
        }
        let (x, _) = self.pre(&data.detach().to_dtype(mean_var.dtype())?)?;
        let mean = x.mean(0)?;
        let std = x.broadcast_sub(&mean.unsqueeze(0)?)?.sqr()?.mean(0)?.sqrt()?;
        let tiny = std.lt(1e-12)?;
        let std = tiny.where_cond(&std.ones_like()?, &std)?;
        mean_var.set(&mean)?;
        std_var.set(&std)?;
        Ok(())
    }
}

impl ModuleT for DenseEncoder {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        rankstack_nn::shape::expect_matrix(LAYER, "dense input", x, self.num_features)?;
        let (mut h, finite) = self.pre(x)?;
        if let Some((mean, std)) = &self.standardize {
            let mean = mean.as_tensor().detach().copy()?.unsqueeze(0)?;
            let std = std.as_tensor().detach().copy()?.unsqueeze(0)?;
            h = h.broadcast_sub(&mean)?.broadcast_div(&std)?;
        }
        if let Some(bn) = &self.batch_norm {
            h = bn.forward_t(&h, train)?;
        }
        if self.config.clamp {
            h = h.clamp(-self.config.clamp_value, self.config.clamp_value)?;
        }
        match &self.indicator_columns {
            None => Ok(h),
            Some(cols) => {
                let missing = finite.index_select(cols, 1)?.to_dtype(h.dtype())?.affine(-1.0, 1.0)?;
                Tensor::cat(&[&h, &missing], 1)
            }
        }
    }
}
