//! One row of data in memory ([`Example`]) and the collation of rows into a [`LabeledBatch`].
//!
//! Collation rules: dense values go to a `[B, n_dense]` f32 matrix (NaN kept: the dense pipeline
//! handles missing values); each sparse feature becomes a [`SparseInput`] of bags; each embedding
//! feature a `[B, dim]` f32 matrix; labels a `[B, T]` f32 matrix (NaN = missing). A sequence keeps
//! its newest (first) `S = max_len` actions and is right-padded to `S` with action type 0,
//! timestamp 0 and item id 0 / a zero vector: action types `[B, S]` u32, timestamps `[B, S]` i64,
//! request times `[B]` i64, item ids `[B, S]` / `[B]` i64 or item vectors `[B, S, E]` / `[B, E]` f32.
//! All tensors are created on the CPU ([`LabeledBatch::to_device`] moves them).

use candle_core::{Device, Tensor};
use feature_encoders::{FeatureBatch, SparseInput};
use ranker_model::{RankerBatch, SequenceItems, UserSequence};
use rankstack_nn::{Error, Result};

use super::batch::LabeledBatch;
use super::schema::{DataSchema, SequenceItemSpec};

const LAYER: &str = "data";

/// One (request, candidate) row, lists in schema order.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// One value per dense feature; NaN = missing (a null in Parquet).
    pub dense: Vec<f32>,
    /// One bag of ids per sparse feature (exactly one id for a single-valued feature).
    pub sparse: Vec<Vec<i64>>,
    /// One vector per embedding feature, of the feature's `dim`.
    pub embedding: Vec<Vec<f32>>,
    /// The user sequence; present iff the schema has one.
    pub sequence: Option<ExampleSequence>,
    /// One label per task, in `[0, 1]`; NaN = missing (a null in Parquet).
    pub labels: Vec<f32>,
    /// Loss weight of the row, if the data has weights.
    pub example_weight: Option<f32>,
}

/// A user's actions before the request, newest first, and the candidate item.
#[derive(Debug, Clone, PartialEq)]
pub struct ExampleSequence {
    /// Action types in `1..num_action_types`, newest first (any length; batches keep the first
    /// `max_len`).
    pub action_types: Vec<i64>,
    /// Action times in ms, one per action.
    pub timestamps: Vec<i64>,
    /// The items acted on and the candidate.
    pub items: ExampleItems,
    /// Request time in ms.
    pub request_time: i64,
}

/// The items of an [`ExampleSequence`].
#[derive(Debug, Clone, PartialEq)]
pub enum ExampleItems {
    /// Item ids (`≥ 0`), one per action, and the candidate's id.
    Ids {
        /// One id per action.
        sequence: Vec<i64>,
        /// The candidate item's id.
        candidate: i64,
    },
    /// Item vectors, one per action, and the candidate's vector.
    Embeddings {
        /// One vector per action.
        sequence: Vec<Vec<f32>>,
        /// The candidate item's vector.
        candidate: Vec<f32>,
    },
}

impl Example {
    /// Checks the row against `schema`; errors name the column (see [`super::columns`]) and the
    /// global `row` index.
    pub fn check(&self, schema: &DataSchema, row: u64) -> Result<()> {
        let bad =
            |column: &str, reason: String| Err(Error::input(LAYER, format!("column `{column}`, row {row}"), reason));
        let f = &schema.features;
        if self.dense.len() != f.dense.len() {
            return bad("<dense>", format!("{} dense values for {} dense features", self.dense.len(), f.dense.len()));
        }
        if self.sparse.len() != f.sparse.len() {
            return bad("<sparse>", format!("{} bags for {} sparse features", self.sparse.len(), f.sparse.len()));
        }
        for (feature, bag) in f.sparse.iter().zip(&self.sparse) {
            if let Some(id) = bag.iter().find(|&&id| id < 0) {
                return bad(&feature.name, format!("negative id {id}"));
            }
        }
        if self.embedding.len() != f.embedding.len() {
            return bad(
                "<embedding>",
                format!("{} vectors for {} embedding features", self.embedding.len(), f.embedding.len()),
            );
        }
        for (feature, v) in f.embedding.iter().zip(&self.embedding) {
            if v.len() != feature.dim {
                return bad(&feature.name, format!("vector of length {}, expected {}", v.len(), feature.dim));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return bad(&feature.name, "non-finite value in the vector".into());
            }
        }
        if self.labels.len() != schema.tasks.len() {
            return bad("<labels>", format!("{} labels for {} tasks", self.labels.len(), schema.tasks.len()));
        }
        for (task, &y) in schema.tasks.iter().zip(&self.labels) {
            if !y.is_nan() && !(0.0..=1.0).contains(&y) {
                return bad(&format!("label_{task}"), format!("label {y} is outside [0, 1] (use null for missing)"));
            }
        }
        if let Some(w) = self.example_weight {
            if !(w.is_finite() && w >= 0.0) {
                return bad("example_weight", format!("weight {w} must be finite and ≥ 0"));
            }
        }
        match (&schema.sequence, &self.sequence) {
            (None, None) => Ok(()),
            (None, Some(_)) => bad("seq_action_types", "the schema has no sequence".into()),
            (Some(_), None) => bad("seq_action_types", "the schema has a sequence but the row has none".into()),
            (Some(spec), Some(s)) => {
                let n = s.action_types.len();
                if let Some(t) = s.action_types.iter().find(|&&t| t < 1 || t >= spec.num_action_types as i64) {
                    return bad("seq_action_types", format!("action type {t} is outside 1..{}", spec.num_action_types));
                }
                if s.timestamps.len() != n {
                    return bad("seq_timestamps", format!("{} timestamps for {n} action types", s.timestamps.len()));
                }
                match (&spec.items, &s.items) {
                    (SequenceItemSpec::Ids { .. }, ExampleItems::Ids { sequence, candidate }) => {
                        if sequence.len() != n {
                            return bad("seq_item_ids", format!("{} item ids for {n} action types", sequence.len()));
                        }
                        if let Some(id) = sequence.iter().find(|&&id| id < 0) {
                            return bad("seq_item_ids", format!("negative item id {id}"));
                        }
                        if *candidate < 0 {
                            return bad("candidate_item_id", format!("negative item id {candidate}"));
                        }
                        Ok(())
                    }
                    (SequenceItemSpec::Embeddings { dim }, ExampleItems::Embeddings { sequence, candidate }) => {
                        if sequence.len() != n {
                            return bad(
                                "seq_item_embeddings",
                                format!("{} item vectors for {n} action types", sequence.len()),
                            );
                        }
                        if sequence.iter().any(|v| v.len() != *dim) {
                            return bad("seq_item_embeddings", format!("an item vector's length is not {dim}"));
                        }
                        if sequence.iter().flatten().any(|x| !x.is_finite()) {
                            return bad("seq_item_embeddings", "non-finite value in an item vector".into());
                        }
                        if candidate.len() != *dim || candidate.iter().any(|x| !x.is_finite()) {
                            return bad("candidate_item_embedding", format!("needs {dim} finite values"));
                        }
                        Ok(())
                    }
                    (SequenceItemSpec::Ids { .. }, _) => bad("seq_item_ids", "the schema wants item ids".into()),
                    (SequenceItemSpec::Embeddings { .. }, _) => {
                        bad("seq_item_embeddings", "the schema wants item embeddings".into())
                    }
                }
            }
        }
    }
}

/// Collates rows into one [`LabeledBatch`] (see the module doc for the layout). `row_index` gives
/// each row's global index (same length as `rows`). Every row is checked first
/// ([`Example::check`]).
pub fn collate(schema: &DataSchema, rows: &[Example], row_index: &[u64]) -> Result<LabeledBatch> {
    if rows.len() != row_index.len() {
        return Err(Error::input(LAYER, "row_index", format!("{} indices for {} rows", row_index.len(), rows.len())));
    }
    for (row, &index) in rows.iter().zip(row_index) {
        row.check(schema, index)?;
    }
    let b = rows.len();
    // The batch is built on the host; `inputs_to_device` copies the model inputs (counted there).
    let f = &schema.features;
    let dense = if f.dense.is_empty() {
        None
    } else {
        let values: Vec<f32> = rows.iter().flat_map(|r| r.dense.iter().copied()).collect();
        Some(Tensor::from_vec(values, (b, f.dense.len()), &Device::Cpu)?)
    };
    let sparse = (0..f.sparse.len())
        .map(|i| SparseInput::from_bags(&rows.iter().map(|r| &r.sparse[i][..]).collect::<Vec<_>>()))
        .collect();
    let embedding = f
        .embedding
        .iter()
        .enumerate()
        .map(|(i, feat)| {
            let values: Vec<f32> = rows.iter().flat_map(|r| r.embedding[i].iter().copied()).collect();
            Tensor::from_vec(values, (b, feat.dim), &Device::Cpu)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let sequence = match &schema.sequence {
        None => None,
        Some(spec) => {
            let s = spec.max_len;
            let mut types = vec![0u32; b * s];
            let mut stamps = vec![0i64; b * s];
            let mut request = Vec::with_capacity(b);
            let seqs: Vec<&ExampleSequence> = rows.iter().filter_map(|r| r.sequence.as_ref()).collect();
            for (r, seq) in seqs.iter().enumerate() {
                let n = seq.action_types.len().min(s);
                for j in 0..n {
                    types[r * s + j] = seq.action_types[j] as u32;
                    stamps[r * s + j] = seq.timestamps[j];
                }
                request.push(seq.request_time);
            }
            let items = match &spec.items {
                SequenceItemSpec::Ids { .. } => {
                    let mut ids = vec![0i64; b * s];
                    let mut cand = Vec::with_capacity(b);
                    for (r, seq) in seqs.iter().enumerate() {
                        if let ExampleItems::Ids { sequence, candidate } = &seq.items {
                            for (j, &id) in sequence.iter().take(s).enumerate() {
                                ids[r * s + j] = id;
                            }
                            cand.push(*candidate);
                        }
                    }
                    SequenceItems::Ids {
                        sequence: Tensor::from_vec(ids, (b, s), &Device::Cpu)?,
                        candidate: Tensor::from_vec(cand, b, &Device::Cpu)?,
                    }
                }
                SequenceItemSpec::Embeddings { dim } => {
                    let e = *dim;
                    let mut vecs = vec![0f32; b * s * e];
                    let mut cand = Vec::with_capacity(b * e);
                    for (r, seq) in seqs.iter().enumerate() {
                        if let ExampleItems::Embeddings { sequence, candidate } = &seq.items {
                            for (j, v) in sequence.iter().take(s).enumerate() {
                                vecs[(r * s + j) * e..(r * s + j + 1) * e].copy_from_slice(v);
                            }
                            cand.extend_from_slice(candidate);
                        }
                    }
                    SequenceItems::Embeddings {
                        sequence: Tensor::from_vec(vecs, (b, s, e), &Device::Cpu)?,
                        candidate: Tensor::from_vec(cand, (b, e), &Device::Cpu)?,
                    }
                }
            };
            Some(UserSequence {
                action_types: Tensor::from_vec(types, (b, s), &Device::Cpu)?,
                timestamps: Tensor::from_vec(stamps, (b, s), &Device::Cpu)?,
                request_time: Tensor::from_vec(request, b, &Device::Cpu)?,
                items,
            })
        }
    };
    let labels: Vec<f32> = rows.iter().flat_map(|r| r.labels.iter().copied()).collect();
    let labels = Tensor::from_vec(labels, (b, schema.tasks.len()), &Device::Cpu)?;
    let example_weights = if rows.iter().any(|r| r.example_weight.is_some()) {
        let w: Vec<f32> = rows.iter().map(|r| r.example_weight.unwrap_or(1.0)).collect();
        Some(Tensor::from_vec(w, b, &Device::Cpu)?)
    } else {
        None
    };
    Ok(LabeledBatch {
        batch: RankerBatch { features: FeatureBatch { dense, sparse, embedding, extra: Vec::new() }, sequence },
        labels,
        example_weights,
        rows: b,
        row_index: row_index.to_vec(),
    })
}
