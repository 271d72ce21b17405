//! The learned item table used when sequences arrive as item ids.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use rankstack_nn::{init::xavier_normal, Error, RowGather, RowGradient};

use crate::ItemEmbeddingConfig;

/// `item_embedding.weight` `[cardinality + 1, dim]`: row `id` for `id < cardinality`, the last row
/// for every other id (out of vocabulary). Negative ids are an error. Training lookups support
/// row-sparse gradients like the feature tables ([`rankstack_nn::row_sparse`]).
#[derive(Debug, Clone)]
pub struct ItemTable {
    weight: Tensor,
    cardinality: usize,
    gather: RowGather,
}

impl ItemTable {
    /// A table of `config.cardinality + 1` rows of width `dim`.
    pub fn new(config: &ItemEmbeddingConfig, dim: usize, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        if config.cardinality == 0 {
            return Err(Error::config("Ranker", "item_embedding.cardinality", "must be > 0"));
        }
        let rows = config.cardinality + 1;
        Ok(Self {
            weight: vb.get_with_hints((rows, dim), "weight", xavier_normal(dim, rows))?,
            cardinality: config.cardinality,
            gather: RowGather::default(),
        })
    }

    /// Row-sparse gradient mode for training lookups; off by default.
    pub fn set_row_sparse_gradients(&self, on: bool) {
        self.gather.set_enabled(on);
    }

    /// The gradient of the rows touched by training lookups since the last call (row-sparse mode).
    pub fn take_row_gradients(&self, grads: &GradStore) -> Result<Option<RowGradient>> {
        self.gather.take(&self.weight, grads)
    }

    /// Embeds integer ids of any shape `[...]` into `[..., dim]`; `train` lookups are recorded in
    /// row-sparse mode.
    pub fn lookup(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let flat = rankstack_nn::host_transfer::read_input::<i64>(&ids.to_dtype(DType::I64)?, "item ids")?;
        if let Some(&bad) = flat.iter().find(|&&i| i < 0) {
            return Err(Error::input("Ranker", "item ids", format!("negative item id {bad}")).into());
        }
        let rows: Vec<u32> = flat.iter().map(|&i| (i as usize).min(self.cardinality) as u32).collect();
        let mut dims = ids.dims().to_vec();
        dims.push(self.weight.dim(1)?);
        self.gather.lookup(&self.weight, &rows, train)?.reshape(dims)
    }
}
