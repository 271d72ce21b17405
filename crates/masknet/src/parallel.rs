//! Parallel MaskNet.

use candle_core::{ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use rankstack_nn::reseed::child_seed;
use rankstack_nn::{shape::expect_matrix, Error, Mlp, Reseed};

use crate::{MaskBlock, ParallelMaskNetConfig};

/// `u` [`MaskBlock`]s on the same input (`h = v_emb`), outputs concatenated to `[batch, Σ q_i]`
/// (`u·q` when they share one config), then an optional top MLP. Parameters: `blocks.{i}.…` and
/// `top_mlp.…`.
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # use masknet::{ParallelMaskNet, ParallelMaskNetConfig};
/// # use rankstack_nn::SeededVarMap;
/// // The Pinterest configuration on the 2144-wide encoder output.
/// let params = SeededVarMap::new(0);
/// let masknet = ParallelMaskNet::new(2144, &ParallelMaskNetConfig::paper(), params.var_builder(DType::F32, &Device::Cpu))?;
/// assert_eq!(masknet.output_dim(), 1536);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ParallelMaskNet {
    blocks: Vec<MaskBlock>,
    top_mlp: Option<Mlp>,
    input_dim: usize,
}

impl ParallelMaskNet {
    /// A parallel MaskNet on `input_dim` features.
    pub fn new(input_dim: usize, config: &ParallelMaskNetConfig, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        const LAYER: &str = "ParallelMaskNet";
        let blocks = config
            .block_configs(LAYER)?
            .iter()
            .enumerate()
            .map(|(i, (block, prefix))| {
                MaskBlock::with_name(input_dim, input_dim, block, vb.pp("blocks").pp(i), LAYER, prefix)
            })
            .collect::<rankstack_nn::Result<Vec<_>>>()?;
        let concat_dim = blocks.iter().map(MaskBlock::output_dim).sum();
        let top_mlp = match &config.top_mlp {
            Some(mlp) => Some(Mlp::new(concat_dim, mlp, vb.pp("top_mlp")).map_err(|e| match e {
                Error::Config { field, reason, .. } => Error::config(LAYER, format!("top_mlp.{field}"), reason),
                other => other,
            })?),
            None => None,
        };
        Ok(Self { blocks, top_mlp, input_dim })
    }

    /// Input width.
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// Output width: `u·q`, or the top MLP's output width.
    pub fn output_dim(&self) -> usize {
        match &self.top_mlp {
            Some(mlp) => mlp.output_dim(),
            None => self.blocks.iter().map(MaskBlock::output_dim).sum(),
        }
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

impl ModuleT for ParallelMaskNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        expect_matrix("ParallelMaskNet", "input", x, self.input_dim)?;
        let outs = self.blocks.iter().map(|b| b.forward_unchecked(x, x, train)).collect::<Result<Vec<_>>>()?;
        let y = Tensor::cat(&outs, 1)?;
        match &self.top_mlp {
            Some(mlp) => mlp.forward_t(&y, train),
            None => Ok(y),
        }
    }
}

impl Reseed for ParallelMaskNet {
    fn reseed(&self, seed: u64) {
        for (i, block) in self.blocks.iter().enumerate() {
            block.reseed(child_seed(seed, &format!("blocks.{i}")));
        }
        if let Some(mlp) = &self.top_mlp {
            mlp.reseed(child_seed(seed, "top_mlp"));
        }
    }
}

impl rankstack_nn::LinearLayers for ParallelMaskNet {
    fn linear_layers_mut(&mut self) -> Vec<&mut rankstack_nn::Linear> {
        let mut layers = self.blocks.linear_layers_mut();
        layers.extend(self.top_mlp.linear_layers_mut());
        layers
    }
}
