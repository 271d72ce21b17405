//! Which initialisation a fresh model's parameters are drawn with.

use candle_core::Shape;
use candle_nn::Init;

/// The initialisation convention of a [`crate::SeededVarMap`].
///
/// - `XavierNormal`: every parameter with two or more dimensions whose name does
///   not contain `norm` — linear and cross weights, attention projections, embedding tables
///   (feature tables, the item table, action types) — is drawn from Xavier-normal,
///   `N(0, 2 / (fan_in + fan_out))` with PyTorch's fans (`fan_in = shape[1]·r`,
///   `fan_out = shape[0]·r`, `r` the product of the remaining dimensions); every parameter whose
///   name ends in `bias` starts at zero; everything else (norm scales, learned tokens) as its layer
///   says (the PyTorch reference trainer's `--init xavier-normal`). For a `[rows, dim]` table it
///   gives small rows, `std = sqrt(2 / (rows + dim))`.
/// - `Layers` (what [`crate::SeededVarMap::new`] uses, and the trainer's default; the PyTorch
///   reference trainer's `--init layers` draws the same): each layer's own initialisation, as documented on the layer: Xavier-normal linear,
///   cross and item-table weights, Xavier-uniform attention input projection, PyTorch's default
///   `U(±1/sqrt(in))` for the transformer's feed-forward layers (biases included), feature tables
///   and action-type embeddings `N(0, 1/dim)` (unit-norm rows on average), zero biases elsewhere.
///
/// Layers may still post-process what was drawn (padding rows are zeroed under either scheme).
/// The trainer's default (`TrainOptions::init`) and the measurements behind it: docs/trajectory.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitScheme {
    /// Xavier-normal matrices and tables, zero biases (the PyTorch reference's convention).
    XavierNormal,
    /// Each layer's own initialisation.
    Layers,
}

impl InitScheme {
    /// The initialisation of parameter `name` of `shape`, given the one its layer asks for.
    pub fn init(self, name: &str, shape: &Shape, layer: Init) -> Init {
        match self {
            Self::Layers => layer,
            Self::XavierNormal => {
                let dims = shape.dims();
                if dims.len() >= 2 && !name.contains("norm") {
                    let receptive: usize = dims[2..].iter().product();
                    crate::init::xavier_normal(dims[1] * receptive, dims[0] * receptive)
                } else if name.ends_with("bias") {
                    Init::Const(0.0)
                } else {
                    layer
                }
            }
        }
    }

    /// The CLI spelling (`xavier-normal`, `layers`).
    pub fn name(self) -> &'static str {
        match self {
            Self::XavierNormal => "xavier-normal",
            Self::Layers => "layers",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xavier_normal_replaces_matrices_and_biases_only() {
        let layer = Init::Randn { mean: 0.0, stdev: 0.5 };
        let s = InitScheme::XavierNormal;
        let std = |init: Init| match init {
            Init::Randn { mean, stdev } => (mean, stdev),
            other => panic!("expected a normal init, got {other:?}"),
        };
        // [rows, dim] = [10, 6]: fan_in 6, fan_out 10.
        assert_eq!(
            std(s.init("features.sparse.country.weight", &Shape::from((10, 6)), layer)),
            (0.0, (2.0f64 / 16.0).sqrt())
        );
        assert!(matches!(s.init("mlp.layers.0.bias", &Shape::from(4), layer), Init::Const(c) if c == 0.0));
        assert_eq!(std(s.init("mlp.norms.0.weight", &Shape::from(4), layer)), (0.0, 0.5));
        assert_eq!(std(s.init("encoder.norm.weight", &Shape::from((3, 3)), layer)), (0.0, 0.5));
        assert_eq!(std(InitScheme::Layers.init("t.weight", &Shape::from((10, 6)), layer)), (0.0, 0.5));
        assert_eq!(serde_json::to_string(&InitScheme::XavierNormal).unwrap(), "\"xavier-normal\"");
        assert_eq!(serde_json::from_str::<InitScheme>("\"layers\"").unwrap(), InitScheme::Layers);
    }
}
