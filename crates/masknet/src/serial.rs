//! Serial MaskNet.

use candle_core::{ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use rankstack_nn::reseed::child_seed;
use rankstack_nn::{shape::expect_matrix, Error, Reseed};

use crate::{MaskBlock, SerialMaskNetConfig};

/// MaskBlocks in series: `h₁ = B₁(v, v)`, `h_k = B_k(v, h_{k−1})`; every mask is generated from the
/// embedding `v`. Output `[batch, q_last]`. Parameters: `blocks.{i}.…`.
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # use masknet::{MaskBlockConfig, SerialMaskNet, SerialMaskNetConfig};
/// # use rankstack_nn::SeededVarMap;
/// let config = SerialMaskNetConfig { blocks: vec![MaskBlockConfig::new(64), MaskBlockConfig::new(32)] };
/// let params = SeededVarMap::new(0);
/// let masknet = SerialMaskNet::new(48, &config, params.var_builder(DType::F32, &Device::Cpu))?;
/// assert_eq!(masknet.forward(&Tensor::zeros((2, 48), DType::F32, &Device::Cpu)?)?.dims(), &[2, 32]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SerialMaskNet {
    blocks: Vec<MaskBlock>,
    input_dim: usize,
}

impl SerialMaskNet {
    /// A serial MaskNet on `input_dim` features.
    pub fn new(input_dim: usize, config: &SerialMaskNetConfig, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        const LAYER: &str = "SerialMaskNet";
        if config.blocks.is_empty() {
            return Err(Error::config(LAYER, "blocks", "needs at least one block"));
        }
        let mut blocks = Vec::with_capacity(config.blocks.len());
        let mut hidden_dim = input_dim;
        for (i, block) in config.blocks.iter().enumerate() {
            let b = MaskBlock::with_name(
                input_dim,
                hidden_dim,
                block,
                vb.pp("blocks").pp(i),
                LAYER,
                &format!("blocks[{i}]."),
            )?;
            hidden_dim = b.output_dim();
            blocks.push(b);
        }
        Ok(Self { blocks, input_dim })
    }

    /// Input width.
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// Output width (the last block's).
    pub fn output_dim(&self) -> usize {
        self.blocks.last().map_or(0, MaskBlock::output_dim)
    }

    /// The blocks.
    pub fn blocks(&self) -> &[MaskBlock] {
        &self.blocks
    }

    /// Evaluation-mode forward pass.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}

impl ModuleT for SerialMaskNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        expect_matrix("SerialMaskNet", "input", x, self.input_dim)?;
        let mut h = x.clone();
        for block in &self.blocks {
            h = block.forward_unchecked(x, &h, train)?;
        }
        Ok(h)
    }
}

impl Reseed for SerialMaskNet {
    fn reseed(&self, seed: u64) {
        for (i, block) in self.blocks.iter().enumerate() {
            block.reseed(child_seed(seed, &format!("blocks.{i}")));
        }
    }
}

impl rankstack_nn::LinearLayers for SerialMaskNet {
    fn linear_layers_mut(&mut self) -> Vec<&mut rankstack_nn::Linear> {
        self.blocks.linear_layers_mut()
    }
}
