//! [`DataSchema`]: what a data file holds (features, the optional user sequence, tasks), its JSON
//! form in the file's metadata, and how it fits an architecture preset to the data.

use ranker_model::{ItemEmbeddingConfig, RankerConfig, TaskConfig};
use rankstack_nn::{Error, Result};
use serde::{Deserialize, Serialize};

use feature_encoders::FeatureSchema;

const LAYER: &str = "DataSchema";

/// What a data file holds: the features, the optional user sequence and the tasks (label columns).
/// Serialised as JSON into the Parquet file's metadata; column names follow [`columns`](crate::data::columns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSchema {
    /// Dense, sparse and embedding features (their encoder settings travel with them and become the
    /// model's `features` under [`DataSchema::apply`]). `extra` must be empty: extra blocks are
    /// computed by the model, not read from files.
    pub features: FeatureSchema,
    /// The user-action sequence, if the data has one.
    #[serde(default)]
    pub sequence: Option<SequenceSpec>,
    /// Task names, in label-column order (`label_<task>`).
    pub tasks: Vec<String>,
}

/// The user-action sequence of a data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceSpec {
    /// `S`: batches hold the newest `S` actions (longer sequences are cut, shorter ones padded).
    pub max_len: usize,
    /// Rows of the action-type table including the padding type 0: valid action types in the data
    /// are `1..num_action_types`.
    pub num_action_types: usize,
    /// How the items of the sequence and the candidate are given.
    pub items: SequenceItemSpec,
}

/// How a sequence's items and the candidate are described.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SequenceItemSpec {
    /// Pretrained item vectors of width `dim` (`seq_item_embeddings`, `candidate_item_embedding`).
    Embeddings {
        /// Vector width `E`.
        dim: usize,
    },
    /// Item ids in `0..cardinality` (`seq_item_ids`, `candidate_item_id`), embedded by a learned
    /// table of width `dim`.
    Ids {
        /// Number of item ids.
        cardinality: usize,
        /// Width of the learned item embedding.
        dim: usize,
    },
}

impl SequenceItemSpec {
    /// The item embedding width `E` the sequence encoder sees.
    pub fn dim(&self) -> usize {
        match self {
            Self::Embeddings { dim } | Self::Ids { dim, .. } => *dim,
        }
    }
}

impl DataSchema {
    /// Checks the schema: features valid and without `extra` blocks, at least one task, unique task
    /// names without '.', sequence sizes positive and at least 2 action types.
    pub fn validate(&self) -> Result<()> {
        if !self.features.extra.is_empty() {
            return Err(Error::config(
                LAYER,
                "features.extra",
                "data files cannot hold extra blocks (the model computes them)",
            ));
        }
        self.features.validate()?;
        if self.tasks.is_empty() {
            return Err(Error::config(LAYER, "tasks", "needs at least one task"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, task) in self.tasks.iter().enumerate() {
            if task.is_empty() || task.contains('.') || task.chars().any(char::is_whitespace) {
                return Err(Error::config(
                    LAYER,
                    format!("tasks[{i}]"),
                    format!("`{task}` must be non-empty, without '.' or whitespace"),
                ));
            }
            if !seen.insert(task.as_str()) {
                return Err(Error::config(LAYER, format!("tasks[{i}]"), format!("duplicate task `{task}`")));
            }
        }
        if let Some(seq) = &self.sequence {
            if seq.max_len == 0 || seq.max_len > sequence_transformer::MAX_SEQUENCE_LEN {
                return Err(Error::config(
                    LAYER,
                    "sequence.max_len",
                    format!("must be in 1..={}, got {}", sequence_transformer::MAX_SEQUENCE_LEN, seq.max_len),
                ));
            }
            if seq.num_action_types > sequence_transformer::MAX_ACTION_TYPES {
                return Err(Error::config(
                    LAYER,
                    "sequence.num_action_types",
                    format!("must be at most {}, got {}", sequence_transformer::MAX_ACTION_TYPES, seq.num_action_types),
                ));
            }
            if seq.num_action_types < 2 {
                return Err(Error::config(LAYER, "sequence.num_action_types", "must be ≥ 2 (type 0 is padding)"));
            }
            match seq.items {
                SequenceItemSpec::Embeddings { dim } | SequenceItemSpec::Ids { dim, .. } if dim == 0 => {
                    return Err(Error::config(LAYER, "sequence.items.dim", "must be > 0"));
                }
                SequenceItemSpec::Ids { cardinality: 0, .. } => {
                    return Err(Error::config(LAYER, "sequence.items.cardinality", "must be > 0"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The schema as compact JSON (the form stored in Parquet metadata).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a DataSchema always serialises")
    }

    /// Parses and validates a JSON schema.
    pub fn from_json(text: &str) -> Result<Self> {
        let schema: Self = serde_json::from_str(text).map_err(|e| Error::config(LAYER, "json", e.to_string()))?;
        schema.validate()?;
        Ok(schema)
    }

    /// The schema of the data a model reads: the inverse of [`DataSchema::apply`]. The model's
    /// features (without the sequence encoder's `extra` block), its sequence (length, action
    /// types, and item ids when it has a learned item table, item vectors otherwise) and its tasks.
    /// A model with other `extra` blocks cannot read data files (or serving requests): an error.
    pub fn of_model(config: &RankerConfig) -> Result<Self> {
        let mut features = config.features.clone();
        features.extra.retain(|e| e.name != ranker_model::SEQUENCE_BLOCK);
        let sequence = config.sequence.as_ref().map(|seq| SequenceSpec {
            max_len: seq.max_len,
            num_action_types: seq.num_action_types,
            items: match &config.item_embedding {
                Some(table) => SequenceItemSpec::Ids { cardinality: table.cardinality, dim: seq.item_dim },
                None => SequenceItemSpec::Embeddings { dim: seq.item_dim },
            },
        });
        let schema = Self { features, sequence, tasks: config.tasks.iter().map(|t| t.name.clone()).collect() };
        schema.validate()?;
        Ok(schema)
    }

    /// Makes an architecture preset fit this data:
    ///
    /// - `features` ← the data's features;
    /// - `tasks` ← the data's tasks, in data order; a task whose name the config already has keeps
    ///   its settings (weight, tower, calibration), a new one gets weight 1 and no tower;
    /// - with a sequence: `max_len`, `num_action_types` and `item_dim` come from the data, the
    ///   other TransAct settings from the config (its defaults if the config had no sequence
    ///   encoder); `num_output_positions` is capped at `max_len`; `item_embedding` is set to the
    ///   item cardinality for id sequences and removed for embedding sequences; a config with an
    ///   `action_vocab` (raw ids) is an error, the data's types being mapped already;
    /// - without a sequence: the sequence encoder and the item table are removed.
    ///
    /// The result is validated ([`RankerConfig::validate`]).
    pub fn apply(&self, config: &mut RankerConfig) -> Result<()> {
        self.validate()?;
        config.features = self.features.clone();
        config.tasks = self
            .tasks
            .iter()
            .map(|name| config.tasks.iter().find(|t| &t.name == name).cloned().unwrap_or_else(|| TaskConfig::new(name)))
            .collect();
        match &self.sequence {
            None => {
                config.sequence = None;
                config.item_embedding = None;
            }
            Some(seq) => {
                let mut cfg = config.sequence.take().unwrap_or_default();
                if cfg.action_vocab.is_some() {
                    // Data files hold action types 1..N already; remapping them again would be wrong.
                    return Err(Error::config(
                        LAYER,
                        "sequence.action_vocab",
                        "remaps raw action ids, but data files hold action types 1..num_action_types already; remove it",
                    ));
                }
                cfg.max_len = seq.max_len;
                cfg.num_action_types = seq.num_action_types;
                cfg.item_dim = seq.items.dim();
                cfg.num_output_positions = cfg.num_output_positions.min(seq.max_len);
                config.sequence = Some(cfg);
                config.item_embedding = match seq.items {
                    SequenceItemSpec::Ids { cardinality, .. } => Some(ItemEmbeddingConfig { cardinality }),
                    SequenceItemSpec::Embeddings { .. } => None,
                };
            }
        }
        config.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ranker_model::presets;

    fn schema(items: SequenceItemSpec) -> DataSchema {
        DataSchema {
            features: FeatureSchema {
                dense: vec![feature_encoders::DenseFeature { name: "d".into(), missing_indicator: false }],
                sparse: vec![feature_encoders::SparseFeature::new("s", 10)],
                ..FeatureSchema::default()
            },
            sequence: Some(SequenceSpec { max_len: 5, num_action_types: 4, items }),
            tasks: vec!["save".into(), "like".into()],
        }
    }

    #[test]
    fn apply_fits_a_preset_to_the_data() {
        let mut config = presets::preset("pinterest-homefeed").unwrap();
        config.tasks[0].weight = 3.0;
        let data = schema(SequenceItemSpec::Ids { cardinality: 100, dim: 8 });
        data.apply(&mut config).unwrap();
        assert_eq!(config.features, data.features);
        assert_eq!(config.tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["save", "like"]);
        assert_eq!((config.tasks[0].weight, config.tasks[1].weight), (3.0, 1.0));
        let seq = config.sequence.as_ref().unwrap();
        assert_eq!((seq.max_len, seq.num_action_types, seq.item_dim, seq.num_output_positions), (5, 4, 8, 5));
        assert_eq!(seq.num_layers, presets::homefeed_sequence().num_layers);
        assert_eq!(config.item_embedding, Some(ItemEmbeddingConfig { cardinality: 100 }));

        let data = DataSchema { sequence: None, ..data };
        data.apply(&mut config).unwrap();
        assert!(config.sequence.is_none() && config.item_embedding.is_none());
    }

    #[test]
    fn apply_refuses_an_action_vocab_because_data_types_are_mapped_already() {
        let mut config = presets::preset("pinterest-homefeed").unwrap();
        config.sequence.as_mut().unwrap().action_vocab = Some(vec![7, 3, 9]);
        let e = schema(SequenceItemSpec::Embeddings { dim: 8 }).apply(&mut config).unwrap_err().to_string();
        assert!(e.contains("`sequence.action_vocab`") && e.contains("hold action types 1..num_action_types"), "{e}");
    }

    #[test]
    fn of_model_inverts_apply() {
        for items in [SequenceItemSpec::Ids { cardinality: 100, dim: 8 }, SequenceItemSpec::Embeddings { dim: 4 }] {
            let mut config = presets::preset("pinterest-homefeed").unwrap();
            let data = schema(items);
            data.apply(&mut config).unwrap();
            assert_eq!(DataSchema::of_model(&config).unwrap(), data);
            let data = DataSchema { sequence: None, ..data };
            data.apply(&mut config).unwrap();
            assert_eq!(DataSchema::of_model(&config).unwrap(), data);
        }
    }

    #[test]
    fn sequence_sizes_from_a_file_are_bounded_before_anything_is_allocated() {
        let mut data = schema(SequenceItemSpec::Embeddings { dim: 4 });
        data.sequence.as_mut().unwrap().max_len = 1 << 40;
        assert!(data.validate().unwrap_err().to_string().contains("sequence.max_len"));
        data.sequence.as_mut().unwrap().max_len = 100;
        data.sequence.as_mut().unwrap().num_action_types = usize::MAX;
        assert!(data.validate().unwrap_err().to_string().contains("sequence.num_action_types"));
        let mut sequence = presets::homefeed_sequence();
        sequence.max_len = 1 << 20;
        assert!(sequence.validate().unwrap_err().to_string().contains("max_len"));
    }

    #[test]
    fn schema_json_round_trips_and_rejects_bad_values() {
        let data = schema(SequenceItemSpec::Embeddings { dim: 4 });
        assert_eq!(DataSchema::from_json(&data.to_json()).unwrap(), data);
        let bad = DataSchema { tasks: vec!["a".into(), "a".into()], ..data.clone() };
        assert!(bad.validate().unwrap_err().to_string().contains("duplicate task"));
        let err = DataSchema::from_json(r#"{"features": {}, "tasks": ["x"], "bogus": 1}"#).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
