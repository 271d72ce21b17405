//! Pretrained embedding features with an optional learned projection.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use rankstack_nn::{linear_xavier, Error, Linear};

use crate::schema::EmbeddingFeature;

const LAYER: &str = "EmbeddingProjection";

/// `y = x Wᵀ + b` when the feature has a `projection` width, else `y = x`.
///
/// Parameters (with a projection): `weight` `[projection, dim]` (Xavier normal), `bias`
/// `[projection]` (zero; absent if `projection_bias = false`).
///
/// ```
/// # use candle_core::{Device, DType, Tensor};
/// # use feature_encoders::{EmbeddingFeature, EmbeddingProjection};
/// # use rankstack_nn::SeededVarMap;
/// let params = SeededVarMap::new(0);
/// let f = EmbeddingFeature { name: "pin".into(), dim: 256, projection: Some(64), projection_bias: true, normalize: true };
/// let p = EmbeddingProjection::new(&f, params.var_builder(DType::F32, &Device::Cpu).pp("pin"))?;
/// assert_eq!(p.forward(&Tensor::zeros((2, 256), DType::F32, &Device::Cpu)?)?.dims(), &[2, 64]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct EmbeddingProjection {
    projection: Option<Linear>,
    feature: EmbeddingFeature,
}

impl EmbeddingProjection {
    /// The projection for `feature`.
    pub fn new(feature: &EmbeddingFeature, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        if feature.dim == 0 {
            return Err(Error::config(LAYER, format!("embedding.{}.dim", feature.name), "must be > 0"));
        }
        let projection = match feature.projection {
            Some(0) => {
                return Err(Error::config(LAYER, format!("embedding.{}.projection", feature.name), "must be > 0"))
            }
            Some(out) => Some(linear_xavier(feature.dim, out, feature.projection_bias, vb)?),
            None => None,
        };
        Ok(Self { projection, feature: feature.clone() })
    }

    /// Output width.
    pub fn output_dim(&self) -> usize {
        self.feature.output_dim()
    }

    /// Projects a `[B, dim]` batch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rankstack_nn::shape::expect_matrix(LAYER, &format!("embedding.{}", self.feature.name), x, self.feature.dim)?;
        match &self.projection {
            Some(p) => p.forward(x),
            None => Ok(x.clone()),
        }
    }
}

impl rankstack_nn::LinearLayers for EmbeddingProjection {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        self.projection.linear_layers_mut()
    }
}
