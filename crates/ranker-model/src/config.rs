//! The ranker's configuration: one serde document (TOML or JSON) describing the whole model.

use std::collections::HashSet;

use dcnv2::{CrossNetConfig, ParallelCrossNetConfig};
use feature_encoders::FeatureSchema;
use masknet::{ParallelMaskNetConfig, SerialMaskNetConfig};
use rankstack_nn::{Error, MlpConfig, Result};
use sequence_transformer::SequenceTransformerConfig;
use serde::{Deserialize, Serialize};

const LAYER: &str = "RankerConfig";

/// The whole ranker. Unknown keys anywhere are rejected with the key's name.
///
/// ```toml
/// input_skip = false
/// [features]            # feature_encoders::FeatureSchema
/// [sequence]            # optional sequence_transformer::SequenceTransformerConfig
/// [[backbone]]          # stages, in order
/// type = "parallel_masknet"
/// config = { num_blocks = 3, block = { output_dim = 512 } }
/// [[backbone]]
/// type = "crossnet"
/// config = { num_layers = 4, layer = { type = "full_rank" } }
/// [mlp]                 # rankstack_nn::MlpConfig
/// dims = [512, 256]
/// [[tasks]]
/// name = "save"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankerConfig {
    /// Dense, sparse and embedding features. When a `sequence` encoder is configured, its output is
    /// appended as the last `extra` block, named [`SEQUENCE_BLOCK`]; do not declare it here.
    pub features: FeatureSchema,
    /// The user-sequence encoder (TransAct), if any.
    #[serde(default)]
    pub sequence: Option<SequenceTransformerConfig>,
    /// A learned item table for sequences given as item ids (no pretrained item vectors, e.g.
    /// MovieLens); its width is the sequence's `item_dim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_embedding: Option<ItemEmbeddingConfig>,
    /// Interaction stages applied in order to the encoder output (empty: none).
    #[serde(default)]
    pub backbone: Vec<StageConfig>,
    /// Concatenate the encoder output to the backbone output before the MLP (the paper's baseline
    /// had it; the final model dropped it to save latency).
    #[serde(default)]
    pub input_skip: bool,
    /// The shared MLP (its last layer is activated: it feeds the heads).
    pub mlp: MlpConfig,
    /// One head per task, in output order.
    pub tasks: Vec<TaskConfig>,
}

/// The learned item table of [`RankerConfig::item_embedding`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemEmbeddingConfig {
    /// Number of item ids; ids at or above it share one reserved out-of-vocabulary row.
    pub cardinality: usize,
}

/// Name of the feature block holding the sequence encoder's output.
pub const SEQUENCE_BLOCK: &str = "user_sequence";

/// One interaction stage. Serialised with a `type` tag and the layer's own config under `config`;
/// `input_dim`, if given, is checked against the width the previous stage actually produces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum StageConfig {
    /// [`masknet::ParallelMaskNet`].
    ParallelMasknet {
        /// The layer's config.
        config: ParallelMaskNetConfig,
        /// Expected input width (optional check).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input_dim: Option<usize>,
    },
    /// [`masknet::SerialMaskNet`].
    SerialMasknet {
        /// The layer's config.
        config: SerialMaskNetConfig,
        /// Expected input width (optional check).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input_dim: Option<usize>,
    },
    /// [`dcnv2::CrossNet`] (full rank, low rank or mixture).
    Crossnet {
        /// The layer's config.
        config: CrossNetConfig,
        /// Expected input width (optional check).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input_dim: Option<usize>,
    },
    /// [`dcnv2::ParallelCrossNet`].
    ParallelCrossnet {
        /// The layer's config.
        config: ParallelCrossNetConfig,
        /// Expected input width (optional check).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input_dim: Option<usize>,
    },
}

impl StageConfig {
    /// The declared input width, if any.
    pub fn declared_input_dim(&self) -> Option<usize> {
        match self {
            Self::ParallelMasknet { input_dim, .. }
            | Self::SerialMasknet { input_dim, .. }
            | Self::Crossnet { input_dim, .. }
            | Self::ParallelCrossnet { input_dim, .. } => *input_dim,
        }
    }

    /// The stage's type name as written in configs.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::ParallelMasknet { .. } => "parallel_masknet",
            Self::SerialMasknet { .. } => "serial_masknet",
            Self::Crossnet { .. } => "crossnet",
            Self::ParallelCrossnet { .. } => "parallel_crossnet",
        }
    }
}

/// One prediction task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Unique task name (also the parameter prefix `heads.<name>.`).
    pub name: String,
    /// Weight of this task's loss, `≥ 0`.
    #[serde(default = "one")]
    pub weight: f64,
    /// Optional per-task tower MLP between the shared MLP and the logit.
    #[serde(default)]
    pub tower: Option<MlpConfig>,
    /// Negative down-sampling rate `r ∈ (0, 1]` used in training data; predictions are calibrated
    /// back with `p' = p·r / (1 − p + p·r)`. `None`: no calibration.
    #[serde(default)]
    pub negative_sampling_rate: Option<f64>,
}

fn one() -> f64 {
    1.0
}

impl TaskConfig {
    /// A task with weight 1, no tower and no calibration.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), weight: 1.0, tower: None, negative_sampling_rate: None }
    }
}

impl RankerConfig {
    /// Parses a TOML document. Errors name the offending key and line.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text).map_err(|e| Error::config(LAYER, "toml", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a JSON document. Errors name the offending key.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text).map_err(|e| Error::config(LAYER, "json", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a `.toml` or `.json` file (by extension).
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        let parsed = if path.extension().is_some_and(|e| e == "json") {
            Self::from_json_str(&text)
        } else {
            Self::from_toml_str(&text)
        };
        parsed.map_err(|e| e.in_file(path))
    }

    /// Serialises to TOML.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a RankerConfig always serialises")
    }

    /// Checks what the layers cannot check on their own: tasks, weights, rates, reserved names.
    /// Layer-level values are checked when [`crate::Ranker::new`] builds the layers.
    pub fn validate(&self) -> Result<()> {
        if self.tasks.is_empty() {
            return Err(Error::config(LAYER, "tasks", "needs at least one task"));
        }
        let mut seen = HashSet::new();
        for (i, task) in self.tasks.iter().enumerate() {
            if task.name.is_empty() || task.name.contains('.') {
                return Err(Error::config(
                    LAYER,
                    format!("tasks[{i}].name"),
                    format!("`{}` must be non-empty and contain no '.'", task.name),
                ));
            }
            if !seen.insert(task.name.as_str()) {
                return Err(Error::config(
                    LAYER,
                    format!("tasks[{i}].name"),
                    format!("duplicate task name `{}`", task.name),
                ));
            }
            if !(task.weight.is_finite() && task.weight >= 0.0) {
                return Err(Error::config(
                    LAYER,
                    format!("tasks[{i}].weight"),
                    format!("must be finite and >= 0, got {}", task.weight),
                ));
            }
            if let Some(r) = task.negative_sampling_rate {
                if !(r > 0.0 && r <= 1.0) {
                    return Err(Error::config(
                        LAYER,
                        format!("tasks[{i}].negative_sampling_rate"),
                        format!("must be in (0, 1], got {r}"),
                    ));
                }
            }
        }
        if self.features.extra.iter().any(|e| e.name == SEQUENCE_BLOCK) {
            return Err(Error::config(
                LAYER,
                "features.extra",
                format!("`{SEQUENCE_BLOCK}` is reserved for the sequence encoder's output"),
            ));
        }
        Ok(())
    }
}
