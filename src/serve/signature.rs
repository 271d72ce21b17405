//! A served model's tensor signature: the inputs (name, datatype, shape) that the Open Inference
//! Protocol's metadata endpoint announces and the infer endpoint checks, derived from the
//! checkpoint's [`DataSchema`] with the Parquet column names ([`crate::data::columns`]), and the
//! outputs (one probability per task, `p_<task>`, as `rankstack score` names its columns).

use serde_json::{json, Value};

use crate::data::{columns, DataSchema, SequenceItemSpec};

/// The tensor element types the server reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datatype {
    /// 32-bit float (JSON numbers; binary: little-endian IEEE 754).
    Fp32,
    /// 64-bit signed integer (JSON integers; binary: little-endian).
    Int64,
}

impl Datatype {
    /// The protocol's name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fp32 => "FP32",
            Self::Int64 => "INT64",
        }
    }

    /// Bytes per element in the binary tensor extension.
    pub fn size(self) -> usize {
        match self {
            Self::Fp32 => 4,
            Self::Int64 => 8,
        }
    }
}

/// What an input feeds in the model's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputRole {
    /// Dense feature `i` of the schema: `[B]` (or `[B, 1]`) FP32; JSON `null` = missing.
    Dense(usize),
    /// Sparse feature `i`: `[B]` (one id) or `[B, L]` INT64 bags, `-1` = no id (padding).
    Sparse(usize),
    /// Embedding feature `i`: `[B, dim]` FP32.
    Embedding(usize),
    /// `seq_action_types`: `[B, L]` INT64, newest first, trailing `0` = padding.
    SeqActionTypes,
    /// `seq_timestamps`: `[B, L]` INT64 (ms).
    SeqTimestamps,
    /// `seq_item_ids`: `[B, L]` INT64.
    SeqItemIds,
    /// `seq_item_embeddings`: `[B, L, E]` FP32.
    SeqItemEmbeddings,
    /// `candidate_item_id`: `[B]` INT64.
    CandidateItemId,
    /// `candidate_item_embedding`: `[B, E]` FP32.
    CandidateItemEmbedding,
    /// `request_time`: `[B]` INT64 (ms).
    RequestTime,
}

impl InputRole {
    /// User-level inputs (the sequence and the request time) may be sent once, with batch
    /// dimension 1, for all candidates of a request.
    pub fn is_per_user(self) -> bool {
        matches!(
            self,
            Self::SeqActionTypes | Self::SeqTimestamps | Self::SeqItemIds | Self::SeqItemEmbeddings | Self::RequestTime
        )
    }
}

/// One input tensor of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// Tensor name (the Parquet column name).
    pub name: String,
    /// Element type.
    pub datatype: Datatype,
    /// Shape with `-1` for a free dimension; the first is the candidate (batch) dimension.
    pub shape: Vec<i64>,
    /// What it feeds.
    pub role: InputRole,
}

/// The inputs and outputs of a served model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSignature {
    /// Every input, all required, in schema order (dense, sparse, embedding, sequence).
    pub inputs: Vec<InputSpec>,
    /// Output names, one per task in the model's order: `p_<task>`, FP32 `[B]`.
    pub outputs: Vec<String>,
}

impl ModelSignature {
    /// The signature of a model reading `schema`. Fails if two inputs would share a name (a
    /// feature named like a sequence column).
    pub fn new(schema: &DataSchema) -> rankstack_nn::Result<Self> {
        let f = &schema.features;
        let mut inputs = Vec::new();
        let mut add = |name: &str, datatype, shape: &[i64], role| {
            inputs.push(InputSpec { name: name.to_string(), datatype, shape: shape.to_vec(), role })
        };
        for (i, d) in f.dense.iter().enumerate() {
            add(&d.name, Datatype::Fp32, &[-1], InputRole::Dense(i));
        }
        for (i, s) in f.sparse.iter().enumerate() {
            add(&s.name, Datatype::Int64, &[-1, -1], InputRole::Sparse(i));
        }
        for (i, e) in f.embedding.iter().enumerate() {
            add(&e.name, Datatype::Fp32, &[-1, e.dim as i64], InputRole::Embedding(i));
        }
        if let Some(seq) = &schema.sequence {
            add(columns::SEQ_ACTION_TYPES, Datatype::Int64, &[-1, -1], InputRole::SeqActionTypes);
            add(columns::SEQ_TIMESTAMPS, Datatype::Int64, &[-1, -1], InputRole::SeqTimestamps);
            match seq.items {
                SequenceItemSpec::Ids { .. } => {
                    add(columns::SEQ_ITEM_IDS, Datatype::Int64, &[-1, -1], InputRole::SeqItemIds);
                    add(columns::CANDIDATE_ITEM_ID, Datatype::Int64, &[-1], InputRole::CandidateItemId);
                }
                SequenceItemSpec::Embeddings { dim } => {
                    let e = dim as i64;
                    add(columns::SEQ_ITEM_EMBEDDINGS, Datatype::Fp32, &[-1, -1, e], InputRole::SeqItemEmbeddings);
                    add(columns::CANDIDATE_ITEM_EMBEDDING, Datatype::Fp32, &[-1, e], InputRole::CandidateItemEmbedding);
                }
            }
            add(columns::REQUEST_TIME, Datatype::Int64, &[-1], InputRole::RequestTime);
        }
        let mut seen = std::collections::HashSet::new();
        for input in &inputs {
            if !seen.insert(input.name.as_str()) {
                return Err(rankstack_nn::Error::config(
                    "serve",
                    "features",
                    format!("two inputs are named `{}`: rename the feature", input.name),
                ));
            }
        }
        Ok(Self { inputs, outputs: schema.tasks.iter().map(|t| format!("p_{t}")).collect() })
    }

    /// The input named `name`, with its index.
    pub fn input(&self, name: &str) -> Option<(usize, &InputSpec)> {
        self.inputs.iter().enumerate().find(|(_, i)| i.name == name)
    }

    /// The inputs and outputs as the metadata endpoint lists them.
    pub fn metadata_tensors(&self) -> (Value, Value) {
        let inputs: Vec<Value> = self
            .inputs
            .iter()
            .map(|i| json!({"name": i.name, "datatype": i.datatype.as_str(), "shape": i.shape}))
            .collect();
        let outputs: Vec<Value> =
            self.outputs.iter().map(|o| json!({"name": o, "datatype": "FP32", "shape": [-1]})).collect();
        (Value::Array(inputs), Value::Array(outputs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::SyntheticSpec;

    #[test]
    fn the_synthetic_schema_gives_one_input_per_column() {
        let sig = ModelSignature::new(&SyntheticSpec::default().schema()).unwrap();
        let names: Vec<&str> = sig.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names.len(), 4 + 7 + 2 + 5, "{names:?}");
        assert_eq!(names[0], "user_activity");
        assert_eq!(
            &names[13..],
            ["seq_action_types", "seq_timestamps", "seq_item_ids", "candidate_item_id", "request_time"]
        );
        let (_, visual) = sig.input("item_visual").unwrap();
        assert_eq!((visual.datatype, visual.shape.as_slice()), (Datatype::Fp32, &[-1, 16][..]));
        assert_eq!(sig.outputs, ["p_save", "p_click", "p_closeup", "p_hide"]);
    }

    #[test]
    fn a_feature_named_like_a_sequence_column_is_refused() {
        let mut schema = SyntheticSpec::default().schema();
        schema.features.dense[0].name = "request_time".into();
        let err = ModelSignature::new(&schema).unwrap_err().to_string();
        assert!(err.contains("`request_time`"), "{err}");
    }
}
