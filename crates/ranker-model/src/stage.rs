//! One interaction stage of the backbone.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use dcnv2::{CrossNet, ParallelCrossNet};
use masknet::{ParallelMaskNet, SerialMaskNet};
use rankstack_nn::{Error, Reseed};

use crate::StageConfig;

/// A built interaction stage (see [`StageConfig`]).
#[derive(Debug)]
pub enum Stage {
    /// Parallel MaskNet.
    ParallelMaskNet(ParallelMaskNet),
    /// Serial MaskNet.
    SerialMaskNet(SerialMaskNet),
    /// Stacked cross layers.
    CrossNet(CrossNet),
    /// Parallel cross towers.
    ParallelCrossNet(ParallelCrossNet),
}

impl Reseed for Stage {
    /// Reseeds a MaskNet's dropout; cross layers draw no random numbers.
    fn reseed(&self, seed: u64) {
        match self {
            Self::ParallelMaskNet(m) => m.reseed(seed),
            Self::SerialMaskNet(m) => m.reseed(seed),
            Self::CrossNet(_) | Self::ParallelCrossNet(_) => {}
        }
    }
}

impl Stage {
    /// Builds stage `index` on `input_dim` features; errors name the field as `backbone[index].…`.
    pub fn new(index: usize, input_dim: usize, config: &StageConfig, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        let field = |f: &str| format!("backbone[{index}].{f}");
        if let Some(declared) = config.declared_input_dim() {
            if declared != input_dim {
                return Err(Error::config(
                    "Ranker",
                    field("input_dim"),
                    format!("the stage declares input width {declared}, but its input is {input_dim} wide"),
                ));
            }
        }
        let built = match config {
            StageConfig::ParallelMasknet { config, .. } => {
                ParallelMaskNet::new(input_dim, config, vb).map(Self::ParallelMaskNet)
            }
            StageConfig::SerialMasknet { config, .. } => {
                SerialMaskNet::new(input_dim, config, vb).map(Self::SerialMaskNet)
            }
            StageConfig::Crossnet { config, .. } => CrossNet::new(input_dim, config, vb).map(Self::CrossNet),
            StageConfig::ParallelCrossnet { config, .. } => {
                ParallelCrossNet::new(input_dim, config, vb).map(Self::ParallelCrossNet)
            }
        };
        // Re-address the layer's own config errors to the ranker config's field path.
        built.map_err(|e| e.nested_in("Ranker", &field("config")))
    }

    /// Output width.
    pub fn output_dim(&self) -> usize {
        match self {
            Self::ParallelMaskNet(m) => m.output_dim(),
            Self::SerialMaskNet(m) => m.output_dim(),
            Self::CrossNet(c) => c.output_dim(),
            Self::ParallelCrossNet(c) => c.output_dim(),
        }
    }
}

impl ModuleT for Stage {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::ParallelMaskNet(m) => m.forward_t(x, train),
            Self::SerialMaskNet(m) => m.forward_t(x, train),
            Self::CrossNet(c) => c.forward(x),
            Self::ParallelCrossNet(c) => c.forward(x),
        }
    }
}

impl rankstack_nn::LinearLayers for Stage {
    fn linear_layers_mut(&mut self) -> Vec<&mut rankstack_nn::Linear> {
        match self {
            Stage::ParallelMaskNet(m) => m.linear_layers_mut(),
            Stage::SerialMaskNet(m) => m.linear_layers_mut(),
            Stage::CrossNet(c) => c.linear_layers_mut(),
            Stage::ParallelCrossNet(c) => c.linear_layers_mut(),
        }
    }
}
