//! The feature schema: which dense, sparse, embedding and pre-encoded features a model reads.

use serde::{Deserialize, Serialize};

use rankstack_nn::Error;

use crate::dense::DensePipelineConfig;

const LAYER: &str = "FeatureSchema";

/// The default embedding width for a feature with `cardinality` ids:
/// `clamp(round_up_to_multiple_of_4(6 · cardinality^0.25), 4, 64)`.
///
/// The fourth-root rule is the usual heuristic (width grows slowly with vocabulary size); rounding
/// up to a multiple of 4 keeps tensor widths friendly to vector units; the clamp bounds tiny and
/// huge vocabularies. Examples: 2 → 8, 16 → 12, 250 → 24, 10 000 → 60, ≥ 13 000 → 64.
///
/// ```
/// assert_eq!(feature_encoders::default_embedding_dim(16), 12);
/// assert_eq!(feature_encoders::default_embedding_dim(1_000_000), 64);
/// ```
pub fn default_embedding_dim(cardinality: usize) -> usize {
    // sqrt(sqrt(c)) is exact for perfect fourth powers, unlike powf(0.25).
    let raw = 6.0 * (cardinality as f64).sqrt().sqrt();
    (((raw / 4.0).ceil() as usize) * 4).clamp(4, 64)
}

/// What happens to an id at or above the feature's cardinality. Negative ids are always an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OovPolicy {
    /// Map it to one extra, trainable out-of-vocabulary row (row index `cardinality`, the last).
    #[default]
    Reserved,
    /// Hash it into the table as `id mod cardinality` (an id hashed onto the padding id is padding).
    Hash,
    /// Return an error naming the feature, the id and its position.
    Reject,
}

/// How the embeddings of a bag of ids are combined. An empty bag gives a zero vector either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Sum of the rows.
    #[default]
    Sum,
    /// Mean of the rows (padding entries are not counted).
    Mean,
}

/// All features of a model, in the order their columns appear in the [`crate::FeatureEncoder`]
/// output. Loaded from TOML ([`FeatureSchema::from_toml_str`]) or JSON
/// ([`FeatureSchema::from_json_str`]); [`FeatureSchema::validate`] (also run by the encoder's
/// constructor) rejects bad values with an error naming the feature and field.
///
/// ```
/// # use feature_encoders::FeatureSchema;
/// let schema = FeatureSchema::from_toml_str(r#"
///     dense = [{ name = "age_days" }, { name = "ctr_7d", missing_indicator = true }]
///     sparse = [{ name = "country", cardinality = 250 }, { name = "topics", cardinality = 5000, pooling = "mean" }]
///     embedding = [{ name = "pin_emb", dim = 256, projection = 64 }]
///     extra = [{ name = "user_sequence", dim = 1056 }]
/// "#)?;
/// assert_eq!(schema.sparse[0].embedding_dim(), 24); // 6 · 250^0.25 = 23.8 → 24
/// # Ok::<(), rankstack_nn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSchema {
    /// Continuous features: one column each of the dense input matrix, in this order.
    #[serde(default)]
    pub dense: Vec<DenseFeature>,
    /// How dense columns are transformed (shared by all dense columns, applied per column).
    #[serde(default)]
    pub dense_pipeline: DensePipelineConfig,
    /// Categorical (single- or multi-valued) features, each with its own embedding table.
    #[serde(default)]
    pub sparse: Vec<SparseFeature>,
    /// Pretrained embedding vectors (optionally projected).
    #[serde(default)]
    pub embedding: Vec<EmbeddingFeature>,
    /// Blocks that arrive already encoded (e.g. the user-sequence transformer output), passed through.
    #[serde(default)]
    pub extra: Vec<ExtraFeature>,
}

/// A dense (continuous) feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseFeature {
    /// Unique feature name.
    pub name: String,
    /// Emit an extra 0/1 column that is 1 where the raw value is NaN or ±∞.
    #[serde(default)]
    pub missing_indicator: bool,
}

/// A categorical feature with an embedding table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparseFeature {
    /// Unique feature name (also the parameter name: `sparse.<name>.weight`).
    pub name: String,
    /// Number of valid ids, `0..cardinality`.
    pub cardinality: usize,
    /// Embedding width; `None` uses [`default_embedding_dim`] of the cardinality.
    #[serde(default)]
    pub dim: Option<usize>,
    /// What happens to ids `≥ cardinality`.
    #[serde(default)]
    pub oov: OovPolicy,
    /// How the embeddings of a multi-valued feature's ids are combined.
    #[serde(default)]
    pub pooling: Pooling,
    /// An id that means "no value": its row is zero, gets no gradient and is left out of the pooling
    /// (also out of the count for mean pooling), as PyTorch's `EmbeddingBag(padding_idx=…)`.
    #[serde(default)]
    pub padding_id: Option<usize>,
    /// L2-normalise this feature's output.
    #[serde(default = "yes")]
    pub normalize: bool,
}

/// A pretrained embedding feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingFeature {
    /// Unique feature name (projection parameters: `embedding.<name>.weight` / `.bias`).
    pub name: String,
    /// Input width.
    pub dim: usize,
    /// Output width of a learned linear projection; `None` uses the vector as is.
    #[serde(default)]
    pub projection: Option<usize>,
    /// Whether the projection has a bias.
    #[serde(default = "yes")]
    pub projection_bias: bool,
    /// L2-normalise this feature's output.
    #[serde(default = "yes")]
    pub normalize: bool,
}

/// An already-encoded block concatenated as is (for example the sequence transformer's output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraFeature {
    /// Unique block name.
    pub name: String,
    /// Width of the block.
    pub dim: usize,
}

fn yes() -> bool {
    true
}

impl SparseFeature {
    /// A single-valued feature with every other option at its default.
    pub fn new(name: impl Into<String>, cardinality: usize) -> Self {
        Self {
            name: name.into(),
            cardinality,
            dim: None,
            oov: OovPolicy::default(),
            pooling: Pooling::default(),
            padding_id: None,
            normalize: true,
        }
    }

    /// The embedding width: the override if set, otherwise [`default_embedding_dim`].
    pub fn embedding_dim(&self) -> usize {
        self.dim.unwrap_or_else(|| default_embedding_dim(self.cardinality))
    }

    /// Rows of the table: `cardinality`, plus one reserved out-of-vocabulary row (the last) under
    /// [`OovPolicy::Reserved`].
    pub fn num_rows(&self) -> usize {
        self.cardinality + usize::from(self.oov == OovPolicy::Reserved)
    }
}

impl EmbeddingFeature {
    /// Output width (the projection's if any, else the input width).
    pub fn output_dim(&self) -> usize {
        self.projection.unwrap_or(self.dim)
    }
}

impl FeatureSchema {
    /// Parses and validates a TOML schema.
    pub fn from_toml_str(s: &str) -> rankstack_nn::Result<Self> {
        let schema: Self = toml::from_str(s).map_err(|e| Error::config(LAYER, "toml", e.to_string()))?;
        schema.validate()?;
        Ok(schema)
    }

    /// Parses and validates a JSON schema.
    pub fn from_json_str(s: &str) -> rankstack_nn::Result<Self> {
        let schema: Self = serde_json::from_str(s).map_err(|e| Error::config(LAYER, "json", e.to_string()))?;
        schema.validate()?;
        Ok(schema)
    }

    /// Checks every value; errors name the feature and the field
    /// (e.g. `` FeatureSchema: invalid config `sparse.country.cardinality`: must be > 0 ``).
    pub fn validate(&self) -> rankstack_nn::Result<()> {
        let mut seen = std::collections::HashSet::new();
        let names = self
            .dense
            .iter()
            .map(|f| ("dense", &f.name))
            .chain(self.sparse.iter().map(|f| ("sparse", &f.name)))
            .chain(self.embedding.iter().map(|f| ("embedding", &f.name)))
            .chain(self.extra.iter().map(|f| ("extra", &f.name)));
        for (kind, name) in names {
            if name.is_empty() || name.contains('.') || name.chars().any(char::is_whitespace) {
                return Err(Error::config(
                    LAYER,
                    format!("{kind}.{name}.name"),
                    "must be non-empty, without '.' or whitespace",
                ));
            }
            if !seen.insert(name.as_str()) {
                return Err(Error::config(LAYER, format!("{kind}.{name}.name"), "duplicate feature name"));
            }
        }
        if self.dense.is_empty() && self.sparse.is_empty() && self.embedding.is_empty() && self.extra.is_empty() {
            return Err(Error::config(LAYER, "features", "the schema has no features"));
        }
        self.dense_pipeline.validate()?;
        for f in &self.sparse {
            let field = |x: &str| format!("sparse.{}.{x}", f.name);
            if f.cardinality == 0 {
                return Err(Error::config(LAYER, field("cardinality"), "must be > 0"));
            }
            if u32::try_from(f.num_rows()).is_err() {
                return Err(Error::config(
                    LAYER,
                    field("cardinality"),
                    format!("{} rows do not fit u32 indices", f.num_rows()),
                ));
            }
            if f.dim == Some(0) {
                return Err(Error::config(LAYER, field("dim"), "must be > 0"));
            }
            if let Some(p) = f.padding_id {
                if p >= f.cardinality {
                    return Err(Error::config(
                        LAYER,
                        field("padding_id"),
                        format!("must be < cardinality {}, got {p}", f.cardinality),
                    ));
                }
            }
        }
        for f in &self.embedding {
            if f.dim == 0 {
                return Err(Error::config(LAYER, format!("embedding.{}.dim", f.name), "must be > 0"));
            }
            if f.projection == Some(0) {
                return Err(Error::config(LAYER, format!("embedding.{}.projection", f.name), "must be > 0"));
            }
        }
        for f in &self.extra {
            if f.dim == 0 {
                return Err(Error::config(LAYER, format!("extra.{}.dim", f.name), "must be > 0"));
            }
        }
        Ok(())
    }
}
