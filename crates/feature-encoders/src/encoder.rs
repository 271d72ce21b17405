//! The feature encoder: every feature of a schema to one `[B, D]` matrix.

use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::{ModuleT, Result, Tensor, Var};
use candle_nn::VarBuilder;

use rankstack_nn::row_sparse::pooled_lookups;
use rankstack_nn::{Error, RowGradient};

use crate::normalize::NormalizedBlocks;
use crate::{DenseEncoder, EmbeddingProjection, FeatureSchema, SparseEmbedding, SparseInput};

const LAYER: &str = "FeatureEncoder";

/// The `eps` of the L2 normalisation, as PyTorch's `F.normalize`.
pub const L2_EPS: f64 = 1e-12;

/// One batch of raw features, each list in schema order.
#[derive(Debug, Clone, Default)]
pub struct FeatureBatch {
    /// `[B, n_dense]` float matrix (columns in `schema.dense` order); `None` iff the schema has no
    /// dense features.
    pub dense: Option<Tensor>,
    /// One [`SparseInput`] per `schema.sparse` entry.
    pub sparse: Vec<SparseInput>,
    /// One `[B, dim]` tensor per `schema.embedding` entry.
    pub embedding: Vec<Tensor>,
    /// One `[B, dim]` tensor per `schema.extra` entry (e.g. the sequence transformer's output).
    pub extra: Vec<Tensor>,
}

impl FeatureBatch {
    /// The batch size of the first input (dense, else the first sparse, embedding or extra
    /// input), `None` for an empty batch. The encoder checks that every other input agrees.
    pub fn rows(&self) -> Option<usize> {
        let leading = |t: &Tensor| t.dims().first().copied();
        self.dense
            .as_ref()
            .and_then(leading)
            .or_else(|| self.sparse.first().map(SparseInput::batch_size))
            .or_else(|| self.embedding.first().and_then(leading))
            .or_else(|| self.extra.first().and_then(leading))
    }
}

/// Which kind of feature a block of output columns comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Transformed dense columns.
    Dense,
    /// Missing-value indicator columns.
    DenseMissing,
    /// A sparse feature's pooled embedding.
    Sparse,
    /// A pretrained embedding feature (projected or not).
    Embedding,
    /// A pass-through block.
    Extra,
}

/// A contiguous block of output columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnBlock {
    /// The feature name (`"dense"` / `"dense_missing"` for the dense blocks).
    pub name: String,
    /// Its kind.
    pub kind: BlockKind,
    /// Its columns in the output.
    pub columns: Range<usize>,
}

/// Encodes a [`FeatureBatch`] into one `[B, D]` tensor.
///
/// **Column order** (also returned by [`FeatureEncoder::columns`]):
/// 1. the `n_dense` transformed dense columns, in schema order ([`DenseEncoder`]);
/// 2. one 0/1 missing indicator per dense feature with `missing_indicator = true`, in schema order;
/// 3. each sparse feature's pooled embedding, L2-normalised unless `normalize = false`, in schema
///    order ([`SparseEmbedding`]);
/// 4. each embedding feature, projected if configured, L2-normalised unless `normalize = false`
///    ([`EmbeddingProjection`], [`l2_normalize`](crate::l2_normalize));
/// 5. each extra block as is.
///
/// `D` = [`FeatureEncoder::output_dim`], fixed by the schema. Parameter names match the PyTorch
/// reference module: `dense.batch_norm.{weight,bias}`, `sparse.<name>.weight`,
/// `embedding.<name>.{weight,bias}`; non-trainable state (BatchNorm running statistics, fitted
/// z-score statistics) is listed by [`FeatureEncoder::buffers`].
///
/// ```
/// # use candle_core::{Device, DType, Tensor};
/// # use feature_encoders::{FeatureBatch, FeatureEncoder, FeatureSchema, SparseInput};
/// # use rankstack_nn::SeededVarMap;
/// let schema = FeatureSchema::from_json_str(r#"{
///     "dense": [{"name": "age"}, {"name": "ctr", "missing_indicator": true}],
///     "sparse": [{"name": "country", "cardinality": 16}],
///     "embedding": [{"name": "pin", "dim": 8, "projection": 4}]
/// }"#)?;
/// let params = SeededVarMap::new(0);
/// let enc = FeatureEncoder::new(&schema, params.var_builder(DType::F32, &Device::Cpu))?;
/// assert_eq!(enc.output_dim(), 2 + 1 + 12 + 4);
/// let dev = Device::Cpu;
/// let batch = FeatureBatch {
///     dense: Some(Tensor::new(&[[1f32, f32::NAN], [30., 0.5]], &dev)?),
///     sparse: vec![SparseInput::single(&[3, 20])],
///     embedding: vec![Tensor::ones((2, 8), DType::F32, &dev)?],
///     extra: vec![],
/// };
/// assert_eq!(enc.forward_t(&batch, true)?.dims(), &[2, 19]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct FeatureEncoder {
    schema: FeatureSchema,
    dense: Option<DenseEncoder>,
    sparse: Vec<SparseEmbedding>,
    embedding: Vec<EmbeddingProjection>,
    columns: Vec<ColumnBlock>,
    output_dim: usize,
}

impl FeatureEncoder {
    /// Validates `schema` and creates all parameters.
    pub fn new(schema: &FeatureSchema, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        schema.validate()?;
        let mut columns = Vec::new();
        let mut at = 0;
        let mut push = |name: &str, kind, width: usize| {
            columns.push(ColumnBlock { name: name.to_string(), kind, columns: at..at + width });
            at += width;
        };
        let dense = if schema.dense.is_empty() {
            None
        } else {
            let indicators: Vec<usize> =
                schema.dense.iter().enumerate().filter(|(_, f)| f.missing_indicator).map(|(i, _)| i).collect();
            push("dense", BlockKind::Dense, schema.dense.len());
            if !indicators.is_empty() {
                push("dense_missing", BlockKind::DenseMissing, indicators.len());
            }
            Some(DenseEncoder::new(schema.dense.len(), &indicators, &schema.dense_pipeline, vb.pp("dense"))?)
        };
        let mut sparse = Vec::with_capacity(schema.sparse.len());
        for f in &schema.sparse {
            let table = SparseEmbedding::new(f, vb.pp("sparse").pp(&f.name))?;
            push(&f.name, BlockKind::Sparse, table.dim());
            sparse.push(table);
        }
        let mut embedding = Vec::with_capacity(schema.embedding.len());
        for f in &schema.embedding {
            let p = EmbeddingProjection::new(f, vb.pp("embedding").pp(&f.name))?;
            push(&f.name, BlockKind::Embedding, p.output_dim());
            embedding.push(p);
        }
        for f in &schema.extra {
            push(&f.name, BlockKind::Extra, f.dim);
        }
        Ok(Self { schema: schema.clone(), dense, sparse, embedding, columns, output_dim: at })
    }

    /// Output width `D`.
    pub fn output_dim(&self) -> usize {
        self.output_dim
    }

    /// The output column blocks, in order.
    pub fn columns(&self) -> &[ColumnBlock] {
        &self.columns
    }

    /// The schema.
    pub fn schema(&self) -> &FeatureSchema {
        &self.schema
    }

    /// The dense pipeline, if the schema has dense features.
    pub fn dense(&self) -> Option<&DenseEncoder> {
        self.dense.as_ref()
    }

    /// Fits the dense z-score statistics on a `[N, n_dense]` sample (see [`DenseEncoder::fit`]).
    pub fn fit_dense(&self, data: &Tensor) -> rankstack_nn::Result<()> {
        match &self.dense {
            Some(d) => d.fit(data),
            None => Err(Error::config(LAYER, "dense", "the schema has no dense features to fit")),
        }
    }

    /// Non-trainable state by full name (see [`DenseEncoder::buffers`]); save and restore it with
    /// the weights (e.g. with [`rankstack_nn::checkpoint::load_into`]).
    pub fn buffers(&self) -> Vec<(String, Var)> {
        self.dense.as_ref().map(DenseEncoder::buffers).unwrap_or_default()
    }

    fn check_counts(&self, batch: &FeatureBatch) -> rankstack_nn::Result<()> {
        let count = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(Error::input(LAYER, what, format!("the schema has {want} features, the batch has {got} inputs")))
            }
        };
        count("sparse", batch.sparse.len(), self.schema.sparse.len())?;
        count("embedding", batch.embedding.len(), self.schema.embedding.len())?;
        count("extra", batch.extra.len(), self.schema.extra.len())?;
        count("dense", usize::from(batch.dense.is_some()), usize::from(self.dense.is_some()))
    }

    /// Encodes a batch; `train` selects BatchNorm's batch statistics (and updates its running
    /// statistics). Errors name the feature for wrong counts, batch sizes, widths and ids.
    pub fn forward_t(&self, batch: &FeatureBatch, train: bool) -> Result<Tensor> {
        self.check_counts(batch)?;
        let mut sizes: Vec<(String, usize)> = Vec::new();
        if let Some(d) = &batch.dense {
            sizes.push(("dense".into(), d.dim(0)?));
        }
        for (f, s) in self.schema.sparse.iter().zip(&batch.sparse) {
            sizes.push((format!("sparse.{}", f.name), s.batch_size()));
        }
        for (f, e) in self.schema.embedding.iter().zip(&batch.embedding) {
            sizes.push((format!("embedding.{}", f.name), e.dims().first().copied().unwrap_or(0)));
        }
        for (f, e) in self.schema.extra.iter().zip(&batch.extra) {
            sizes.push((format!("extra.{}", f.name), e.dims().first().copied().unwrap_or(0)));
        }
        let (first, b) = sizes[0].clone();
        if let Some((name, n)) = sizes.iter().find(|(_, n)| *n != b) {
            return Err(
                Error::input(LAYER, name, format!("batch size {n} differs from `{first}`'s batch size {b}")).into()
            );
        }

        let mut blocks = NormalizedBlocks::default();
        if let (Some(enc), Some(x)) = (&self.dense, &batch.dense) {
            blocks.push(enc.forward_t(x, train)?, false)?;
        }
        // All sparse features at once: in scoring on a GPU their bags go over in two uploads.
        let lookups =
            self.sparse.iter().zip(&batch.sparse).map(|(t, input)| t.bags_of(input)).collect::<Result<_>>()?;
        for (table, pooled) in self.sparse.iter().zip(pooled_lookups(lookups, train)?) {
            blocks.push(pooled, table.feature().normalize)?;
        }
        for ((p, f), x) in self.embedding.iter().zip(&self.schema.embedding).zip(&batch.embedding) {
            blocks.push(p.forward(x)?, f.normalize)?;
        }
        for (f, x) in self.schema.extra.iter().zip(&batch.extra) {
            rankstack_nn::shape::expect_matrix(LAYER, &format!("extra.{}", f.name), x, f.dim)?;
            blocks.push(x.clone(), false)?;
        }
        // All blocks share one dtype: the parameters' (extra blocks and pretrained vectors must
        // already be in it; candle's cat reports a mismatch).
        Tensor::cat(&blocks.finish()?, 1)
    }

    /// Evaluation-mode forward pass.
    pub fn forward(&self, batch: &FeatureBatch) -> Result<Tensor> {
        self.forward_t(batch, false)
    }

    /// Row-sparse gradients for every sparse table (see [`SparseEmbedding`]); off by default.
    pub fn set_row_sparse_gradients(&self, on: bool) {
        self.sparse.iter().for_each(|t| t.set_row_sparse_gradients(on));
    }

    /// The row gradients of every sparse table touched by training lookups since the last call.
    pub fn take_row_gradients(&self, grads: &GradStore) -> Result<Vec<RowGradient>> {
        Ok(self
            .sparse
            .iter()
            .map(|t| t.take_row_gradients(grads))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect())
    }
}

impl rankstack_nn::LinearLayers for FeatureEncoder {
    fn linear_layers_mut(&mut self) -> Vec<&mut rankstack_nn::Linear> {
        self.embedding.linear_layers_mut()
    }
}
