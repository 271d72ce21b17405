//! [`LabeledBatch`]: one batch of training or evaluation data, and moving its model inputs to a
//! device.

use candle_core::{Device, Tensor};
use ranker_model::{RankerBatch, SequenceItems, UserSequence};
use rankstack_nn::host_transfer::{move_to_device, Origin};
use rankstack_nn::Result;

/// One batch of training or evaluation data.
#[derive(Debug, Clone)]
pub struct LabeledBatch {
    /// The model inputs.
    pub batch: RankerBatch,
    /// `[B, T]` f32 labels in [`DataSchema::tasks`](crate::data::DataSchema::tasks) order; NaN marks a missing label (mask it out of
    /// the loss and the metrics).
    pub labels: Tensor,
    /// `[B]` f32 per-example loss weights, when the file has an `example_weight` column.
    pub example_weights: Option<Tensor>,
    /// `B`, the number of rows.
    pub rows: usize,
    /// The global (0-based, file-order) row index of each row, e.g. to write scores back in order.
    pub row_index: Vec<u64>,
}

impl LabeledBatch {
    /// The same batch with its model inputs on `device` ([`inputs_to_device`]); the labels and
    /// example weights stay on the host (the loss validates them there and copies them once;
    /// evaluation reads them there). Nothing is copied on the CPU.
    pub fn into_device(self, device: &Device) -> Result<Self> {
        let batch = inputs_to_device(self.batch, device)?;
        Ok(Self { batch, ..self })
    }
}

/// `batch` with its float model inputs on `device`: dense features, pretrained embeddings, extra
/// columns and the sequence's item and candidate embeddings. What the model reads on the host
/// stays there — sparse ids and the sequence's action types, timestamps, request times and item
/// ids (validated, masked and packed on the host; only the index tensors derived from them are
/// copied) — so one step moves one batch of inputs to the device and nothing back but the loss.
/// Each tensor is one [`host_transfer`](rankstack_nn::host_transfer) write, `"batch input"`
/// (recorded on the CPU too, where nothing is copied).
pub fn inputs_to_device(batch: RankerBatch, device: &Device) -> Result<RankerBatch> {
    let mv = |t: &Tensor| move_to_device(t, device, "batch input", Origin::Input);
    let f = &batch.features;
    let features = feature_encoders::FeatureBatch {
        dense: f.dense.as_ref().map(mv).transpose()?,
        sparse: f.sparse.clone(),
        embedding: f.embedding.iter().map(mv).collect::<candle_core::Result<_>>()?,
        extra: f.extra.iter().map(mv).collect::<candle_core::Result<_>>()?,
    };
    let sequence = match &batch.sequence {
        None => None,
        Some(s) => Some(UserSequence {
            items: match &s.items {
                SequenceItems::Embeddings { sequence, candidate } => {
                    SequenceItems::Embeddings { sequence: mv(sequence)?, candidate: mv(candidate)? }
                }
                ids @ SequenceItems::Ids { .. } => ids.clone(),
            },
            ..s.clone()
        }),
    };
    Ok(RankerBatch { features, sequence })
}
