//! Embedding tables for categorical features, with multi-valued (bag) pooling and an OOV policy.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use rankstack_nn::host_transfer::read_input;
use rankstack_nn::row_sparse::{pooled_lookups, PooledLookup};
use rankstack_nn::{Error, RowGather, RowGradient};

use crate::schema::{OovPolicy, Pooling, SparseFeature};

const LAYER: &str = "SparseEmbedding";

/// The ids of one sparse feature for a batch, in PyTorch `EmbeddingBag` layout: bag `b` is
/// `ids[offsets[b]..offsets[b + 1]]` (the last bag runs to the end of `ids`). Bags may be empty and
/// of any length, so single-valued and multi-valued features use the same type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SparseInput {
    ids: Vec<i64>,
    offsets: Vec<usize>,
}

impl SparseInput {
    /// From flat ids and bag start offsets (`offsets.len()` is the batch size; offsets must start at
    /// 0, be non-decreasing and not exceed `ids.len()`).
    pub fn new(ids: Vec<i64>, offsets: Vec<usize>) -> rankstack_nn::Result<Self> {
        if offsets.first().is_some_and(|&o| o != 0) {
            return Err(Error::input(LAYER, "offsets", "must start at 0"));
        }
        if offsets.windows(2).any(|w| w[1] < w[0]) || offsets.last().is_some_and(|&o| o > ids.len()) {
            return Err(Error::input(
                LAYER,
                "offsets",
                format!("must be non-decreasing and ≤ {} (the number of ids)", ids.len()),
            ));
        }
        Ok(Self { ids, offsets })
    }

    /// One id per example.
    pub fn single(ids: &[i64]) -> Self {
        Self { ids: ids.to_vec(), offsets: (0..ids.len()).collect() }
    }

    /// From one list of ids per example.
    pub fn from_bags<B: AsRef<[i64]>>(bags: &[B]) -> Self {
        let mut ids = Vec::new();
        let mut offsets = Vec::with_capacity(bags.len());
        for bag in bags {
            offsets.push(ids.len());
            ids.extend_from_slice(bag.as_ref());
        }
        Self { ids, offsets }
    }

    /// From integer tensors `ids` `[N]` and `offsets` `[B]` (as PyTorch's `EmbeddingBag`).
    pub fn from_tensors(ids: &Tensor, offsets: &Tensor) -> rankstack_nn::Result<Self> {
        let ids = read_input::<i64>(&ids.to_dtype(DType::I64)?, "sparse ids")?;
        let offsets = read_input::<i64>(&offsets.to_dtype(DType::I64)?, "sparse offsets")?;
        if offsets.iter().any(|&o| o < 0) {
            return Err(Error::input(LAYER, "offsets", "must be ≥ 0"));
        }
        Self::new(ids, offsets.into_iter().map(|o| o as usize).collect())
    }

    /// Number of bags (examples).
    pub fn batch_size(&self) -> usize {
        self.offsets.len()
    }

    /// The ids of bag `b`.
    pub fn bag(&self, b: usize) -> &[i64] {
        let end = self.offsets.get(b + 1).copied().unwrap_or(self.ids.len());
        &self.ids[self.offsets[b]..end]
    }
}

/// One embedding table with bag pooling: for bag `b` with ids `i₁…iₙ` (after the OOV policy and
/// without padding entries), `y_b = Σ_k W[i_k]` (sum) or `y_b = (1/n) Σ_k W[i_k]` (mean), and
/// `y_b = 0` for an empty bag, as PyTorch's `EmbeddingBag`.
///
/// Parameter: `weight` `[rows, dim]` (`rows` = cardinality, + 1 OOV row under
/// [`OovPolicy::Reserved`]), initialised `N(0, 1/dim)`; the padding row, if any, is initialised to
/// zero, is never read and gets no gradient, so it stays zero.
///
/// ```
/// # use candle_core::{Device, DType};
/// # use feature_encoders::{SparseEmbedding, SparseFeature, SparseInput};
/// # use rankstack_nn::SeededVarMap;
/// let params = SeededVarMap::new(0);
/// let table = SparseEmbedding::new(&SparseFeature::new("country", 250), params.var_builder(DType::F32, &Device::Cpu).pp("country"))?;
/// let y = table.forward(&SparseInput::from_bags(&[vec![3, 7], vec![], vec![999]]))?; // 999 → OOV row
/// assert_eq!(y.dims(), &[3, 24]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// With [`SparseEmbedding::set_row_sparse_gradients`] on, training lookups
/// ([`SparseEmbedding::forward_t`] with `train`) go through [`RowGather`]: the table gets no
/// dense gradient, and [`SparseEmbedding::take_row_gradients`] returns the gradient of the rows
/// the batch touched, for a row-sparse optimizer update.
#[derive(Debug, Clone)]
pub struct SparseEmbedding {
    weight: Tensor,
    feature: SparseFeature,
    dim: usize,
    gather: RowGather,
}

impl SparseEmbedding {
    /// The table for `feature` (validated as in [`crate::FeatureSchema::validate`]).
    pub fn new(feature: &SparseFeature, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        crate::FeatureSchema { sparse: vec![feature.clone()], ..Default::default() }.validate()?;
        let dim = feature.embedding_dim();
        let init = Init::Randn { mean: 0.0, stdev: 1.0 / (dim as f64).sqrt() };
        let weight = vb.get_with_hints((feature.num_rows(), dim), "weight", init)?;
        if let Some(p) = feature.padding_id {
            // Zero the padding row in place (the tensor shares its storage with the parameter).
            weight.slice_set(&Tensor::zeros((1, dim), weight.dtype(), weight.device())?, 0, p)?;
        }
        Ok(Self { weight, feature: feature.clone(), dim, gather: RowGather::default() })
    }

    /// Row-sparse gradient mode for training lookups (see the type's docs); off by default.
    pub fn set_row_sparse_gradients(&self, on: bool) {
        self.gather.set_enabled(on);
    }

    /// The gradient of the rows that the training lookups since the last call touched (row-sparse
    /// mode), or `None`.
    pub fn take_row_gradients(&self, grads: &GradStore) -> Result<Option<RowGradient>> {
        self.gather.take(&self.weight, grads)
    }

    /// Output width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The feature this table encodes.
    pub fn feature(&self) -> &SparseFeature {
        &self.feature
    }

    /// Maps an id to its row, or `None` for padding.
    fn row(&self, id: i64, position: usize) -> rankstack_nn::Result<Option<u32>> {
        let f = &self.feature;
        let what = || format!("sparse.{} ids", f.name);
        if id < 0 {
            return Err(Error::input(LAYER, what(), format!("id {id} at position {position} is negative")));
        }
        let card = f.cardinality as u64;
        let id = id as u64;
        let row = if id < card {
            id
        } else {
            match f.oov {
                OovPolicy::Reserved => card,
                OovPolicy::Hash => id % card,
                OovPolicy::Reject => {
                    return Err(Error::input(
                        LAYER,
                        what(),
                        format!(
                            "id {id} at position {position} is out of range for cardinality {card} (oov = \"reject\")"
                        ),
                    ))
                }
            }
        };
        Ok(if f.padding_id == Some(row as usize) { None } else { Some(row as u32) })
    }

    /// Pooled embeddings `[B, dim]` for a batch of bags.
    pub fn forward(&self, input: &SparseInput) -> Result<Tensor> {
        self.forward_t(input, false)
    }

    /// [`SparseEmbedding::forward`]; `train` lookups are recorded in row-sparse mode.
    pub fn forward_t(&self, input: &SparseInput, train: bool) -> Result<Tensor> {
        let mut pooled = pooled_lookups(vec![self.bags_of(input)?], train)?;
        Ok(pooled.remove(0))
    }

    /// The table's bags for `input`, for [`pooled_lookups`] (the encoder looks up all its sparse
    /// features at once): `B · L` rows and weights (`L` the longest bag; unknown and padding ids
    /// weigh 0, mean pooling divides by the bag's known ids), no entries where every bag is empty.
    pub(crate) fn bags_of(&self, input: &SparseInput) -> Result<PooledLookup<'_>> {
        let b = input.batch_size();
        let lmax = (0..b).map(|i| input.bag(i).len()).max().unwrap_or(0);
        let mut rows = vec![0u32; b * lmax];
        let mut weights = vec![0f64; b * lmax];
        for i in 0..b {
            let start = input.offsets[i];
            let mut n = 0usize;
            for (j, &id) in input.bag(i).iter().enumerate() {
                if let Some(r) = self.row(id, start + j)? {
                    rows[i * lmax + j] = r;
                    weights[i * lmax + j] = 1.0;
                    n += 1;
                }
            }
            if self.feature.pooling == Pooling::Mean && n > 0 {
                weights[i * lmax..(i + 1) * lmax].iter_mut().for_each(|w| *w /= n as f64);
            }
        }
        Ok(PooledLookup { gather: &self.gather, table: &self.weight, rows, weights, bags: b })
    }
}
