//! Feature encoders for feed ranking: a feature schema and the layers that turn raw dense, sparse
//! and pretrained-embedding features into one `[B, D]` matrix.
//!
//! - [`FeatureSchema`] (TOML/JSON): named [`DenseFeature`]s, [`SparseFeature`]s,
//!   [`EmbeddingFeature`]s and pass-through [`ExtraFeature`]s.
//! - [`DenseEncoder`]: non-finite → 0 (+ optional missing indicators), signed log1p, fitted z-score,
//!   BatchNorm with running statistics, clamp.
//! - [`SparseEmbedding`]: one table per feature, width by [`default_embedding_dim`], OOV policy,
//!   sum/mean bag pooling, zero padding rows.
//! - [`EmbeddingProjection`]: optional linear projection of a pretrained vector.
//! - [`l2_normalize`]: `x / max(‖x‖₂, 1e-12)`.
//! - [`FeatureEncoder`]: all of the above, concatenated in a documented column order.

#![forbid(unsafe_code)]

pub mod dense;
pub mod embedding;
pub mod encoder;
pub mod normalize;
pub mod schema;
pub mod sparse;

pub use dense::{DenseEncoder, DensePipelineConfig};
pub use embedding::EmbeddingProjection;
pub use encoder::{BlockKind, ColumnBlock, FeatureBatch, FeatureEncoder, L2_EPS};
pub use normalize::l2_normalize;
pub use schema::{
    default_embedding_dim, DenseFeature, EmbeddingFeature, ExtraFeature, FeatureSchema, OovPolicy, Pooling,
    SparseFeature,
};
pub use sparse::{SparseEmbedding, SparseInput};
