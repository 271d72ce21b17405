//! Parallel cross towers.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use rankstack_nn::{shape::expect_matrix, Error};

use crate::{Combine, CrossNet, ParallelCrossNetConfig};

/// `P` independent [`CrossNet`]s on the same input, combined by concatenation (`[batch, P·d]`) or
/// mean (`[batch, d]`). The paper found parallel DCNv2 towers beat one deeper stack. Parameters:
/// `towers.{p}.layers.{l}.…`.
///
/// ```
/// # use candle_core::{DType, Device, Module, Tensor};
/// # use dcnv2::{Combine, CrossNetConfig, ParallelCrossNet, ParallelCrossNetConfig};
/// # use rankstack_nn::SeededVarMap;
/// let config = ParallelCrossNetConfig { num_towers: 2, tower: CrossNetConfig::low_rank(3, 8), combine: Combine::Concat };
/// let params = SeededVarMap::new(0);
/// let towers = ParallelCrossNet::new(32, &config, params.var_builder(DType::F32, &Device::Cpu))?;
/// let y = towers.forward(&Tensor::zeros((4, 32), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), &[4, 64]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct ParallelCrossNet {
    towers: Vec<CrossNet>,
    combine: Combine,
    dim: usize,
}

impl ParallelCrossNet {
    /// `config.num_towers` towers reading `input_dim` features.
    pub fn new(input_dim: usize, config: &ParallelCrossNetConfig, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        if config.num_towers == 0 {
            return Err(Error::config("ParallelCrossNet", "num_towers", "must be > 0"));
        }
        let towers = (0..config.num_towers)
            .map(|p| CrossNet::with_name(input_dim, &config.tower, vb.pp("towers").pp(p), "ParallelCrossNet", "tower."))
            .collect::<rankstack_nn::Result<Vec<_>>>()?;
        Ok(Self { towers, combine: config.combine, dim: input_dim })
    }

    /// Input width `d`.
    pub fn input_dim(&self) -> usize {
        self.dim
    }

    /// Output width: `P·d` for concatenation, `d` for the mean.
    pub fn output_dim(&self) -> usize {
        match self.combine {
            Combine::Concat => self.towers.len() * self.dim,
            Combine::Mean => self.dim,
        }
    }
}

impl Module for ParallelCrossNet {
    fn forward(&self, x0: &Tensor) -> Result<Tensor> {
        expect_matrix("ParallelCrossNet", "input", x0, self.dim)?;
        let outs = self.towers.iter().map(|t| t.forward_unchecked(x0)).collect::<Result<Vec<_>>>()?;
        match self.combine {
            Combine::Concat => Tensor::cat(&outs, 1),
            Combine::Mean => Tensor::stack(&outs, 0)?.mean(0),
        }
    }
}

impl rankstack_nn::LinearLayers for ParallelCrossNet {
    fn linear_layers_mut(&mut self) -> Vec<&mut rankstack_nn::Linear> {
        self.towers.linear_layers_mut()
    }
}
