//! Reading training data from Parquet: the column convention and the streaming, checked reader.
//!
//! # Column convention
//!
//! One row per (request, candidate). Column names come from the [`DataSchema`]:
//!
//! | column | Arrow type | null |
//! |---|---|---|
//! | dense feature `<name>` | Float32 or Float64 (Int32/Int64 accepted) | → NaN (missing) |
//! | sparse feature `<name>` | Int64 or Int32 (one id), or `List<Int64 or Int32>` (a bag, may be empty) | → empty bag |
//! | embedding feature `<name>` | `FixedSizeList<Float32, dim>` (Float64 or a List of length dim accepted) | error |
//! | `seq_action_types` | `List<Int64>` (Int32 accepted), newest action first, values in `1..num_action_types` | → empty |
//! | `seq_timestamps` | `List<Int64>` (ms), same length as `seq_action_types` | → empty |
//! | `seq_item_ids` | `List<Int64>`, ids `≥ 0`, same length (item-id sequences) | → empty |
//! | `seq_item_embeddings` | `List<FixedSizeList<Float32, E>>`, same length (item-vector sequences) | → empty |
//! | `candidate_item_id` / `candidate_item_embedding` | Int64 / `FixedSizeList<Float32, E>` | error |
//! | `request_time` | Int64 (ms) | error |
//! | `label_<task>` | Float32 or Float64 in `[0, 1]` (Boolean, Int32/Int64 accepted) | → NaN (missing label) |
//! | `example_weight` (optional) | Float32 (Float64, Int accepted), finite and `≥ 0` | error |
//!
//! The sequence columns, the candidate and `request_time` are required iff the schema has a
//! sequence. Other columns are ignored (only the needed ones are read). Sequences longer than
//! `max_len` keep their newest (first) `max_len` actions, shorter ones are padded (see
//! [`super::collate`]). Negative ids are errors; ids at or above a cardinality are handled by the
//! model's OOV policy.
//!
//! # Errors
//!
//! [`ParquetDataset::open`] checks every required column's presence and type before reading any
//! row; the error names the column. While streaming, a bad value (mismatched sequence lengths, a
//! null where none is allowed, a label outside `[0, 1]`, …) stops the stream with an error naming
//! the column and the first bad row's global (0-based, file-order) index. No row is ever skipped.

//!
//! # Files
//!
//! `column_types.rs` checks a file's columns against the convention before any row is read;
//! `column_views.rs` views one record batch's columns and decodes rows; `dataset.rs` opens a file
//! ([`ParquetDataset`]); `row_batches.rs` streams, shuffles and collates ([`RowBatches`]).

use std::path::Path;

use rankstack_nn::Error;

mod column_types;
mod column_views;
mod dataset;
mod row_batches;

use column_types::*;
use column_views::*;
pub use dataset::{panic_is_handled, ParquetDataset};
pub use row_batches::RowBatches;

const LAYER: &str = "data";

/// Column names of the convention (see the module doc).
pub mod columns {
    /// Action types of the user sequence.
    pub const SEQ_ACTION_TYPES: &str = "seq_action_types";
    /// Action timestamps (ms).
    pub const SEQ_TIMESTAMPS: &str = "seq_timestamps";
    /// Item ids of the sequence.
    pub const SEQ_ITEM_IDS: &str = "seq_item_ids";
    /// Item vectors of the sequence.
    pub const SEQ_ITEM_EMBEDDINGS: &str = "seq_item_embeddings";
    /// The candidate's item id.
    pub const CANDIDATE_ITEM_ID: &str = "candidate_item_id";
    /// The candidate's item vector.
    pub const CANDIDATE_ITEM_EMBEDDING: &str = "candidate_item_embedding";
    /// Request time (ms).
    pub const REQUEST_TIME: &str = "request_time";
    /// Optional per-row loss weight.
    pub const EXAMPLE_WEIGHT: &str = "example_weight";

    /// The label column of `task`: `label_<task>`.
    pub fn label(task: &str) -> String {
        format!("label_{task}")
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::input("parquet", path.display().to_string(), e.to_string())
}

fn col_err(column: &str, reason: impl Into<String>) -> Error {
    Error::input(LAYER, format!("column `{column}`"), reason)
}

fn row_err(column: &str, row: u64, reason: impl Into<String>) -> Error {
    Error::input(LAYER, format!("column `{column}`, row {row}"), reason)
}
