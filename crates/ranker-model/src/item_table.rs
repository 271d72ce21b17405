//! The learned item table used when sequences arrive as item ids.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use rankstack_nn::{init::xavier_normal, Error};

use crate::ItemEmbeddingConfig;

/// `item_embedding.weight` `[cardinality + 1, dim]`: row `id` for `id < cardinality`, the last row
/// for every other id (out of vocabulary). Negative ids are an error.
#[derive(Debug, Clone)]
pub struct ItemTable {
    weight: Tensor,
    cardinality: usize,
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
        })
    }

    /// Embeds integer ids of any shape `[...]` into `[..., dim]`.
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        let flat: Vec<i64> = ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
        if let Some(&bad) = flat.iter().find(|&&i| i < 0) {
            return Err(Error::input("Ranker", "item ids", format!("negative item id {bad}")).into());
        }
        let rows: Vec<u32> = flat.iter().map(|&i| (i as usize).min(self.cardinality) as u32).collect();
        let index = Tensor::from_vec(rows, flat.len(), self.weight.device())?;
        let mut dims = ids.dims().to_vec();
        dims.push(self.weight.dim(1)?);
        self.weight.index_select(&index, 0)?.reshape(dims)
    }
}
