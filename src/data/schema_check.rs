//! Does a data file fit a trained model? The schema a model was trained on, and every difference
//! between it and a file's schema.
//!
//! A checkpoint records the data schema it was trained on: [`DataSchema::apply`] copies the
//! features (names, order, kinds, cardinalities, widths, encoder settings), the task names and the
//! sequence settings into the model's config, so [`DataSchema::of_model`] recovers them from
//! `config.json`. Reading a file with swapped, renamed or resized features through such a model
//! would give different numbers without any error, so `eval`, `score` and `train --resume`
//! compare the two schemas and refuse a file that differs, listing each difference.

use ranker_model::RankerConfig;
use rankstack_nn::{Error, Result};
use serde_json::Value;

use super::DataSchema;

impl DataSchema {
    /// Every difference between `self` (the model's schema) and `data` (a file's), one line each,
    /// as `path: <model's value> in the model, <file's value> in the data`; empty when they agree.
    /// With `compare_tasks == false` the task lists are not compared (scoring reads no labels).
    pub fn differences(&self, data: &DataSchema, compare_tasks: bool) -> Vec<String> {
        let json = |s: &DataSchema| {
            let mut v = serde_json::to_value(s).expect("a DataSchema always serialises");
            if !compare_tasks {
                v.as_object_mut().expect("a struct serialises to an object").remove("tasks");
            }
            v
        };
        let mut out = Vec::new();
        diff(&json(self), &json(data), String::new(), &mut out);
        out
    }

    /// An error for `command` listing every difference between the model's schema (from
    /// `config`) and `data`'s, or `Ok` when they agree.
    pub fn check_fits_model(
        data: &DataSchema,
        config: &RankerConfig,
        command: &str,
        compare_tasks: bool,
    ) -> Result<()> {
        let differences = Self::of_model(config)?.differences(data, compare_tasks);
        if differences.is_empty() {
            return Ok(());
        }
        Err(Error::input(
            command,
            "data",
            format!(
                "the file's schema differs from the one the model was trained on ({} difference{}): {}",
                differences.len(),
                if differences.len() == 1 { "" } else { "s" },
                differences.join("; ")
            ),
        ))
    }
}

fn diff(model: &Value, data: &Value, path: String, out: &mut Vec<String>) {
    let at = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    match (model, data) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                diff(a.get(key).unwrap_or(&Value::Null), b.get(key).unwrap_or(&Value::Null), at(key), out);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                match (a.get(i), b.get(i)) {
                    (Some(x), Some(y)) => diff(x, y, format!("{path}[{i}]"), out),
                    (Some(x), None) => {
                        out.push(format!("{path}[{i}]: {} in the model, absent from the data", short(x)))
                    }
                    (None, Some(y)) => {
                        out.push(format!("{path}[{i}]: absent from the model, {} in the data", short(y)))
                    }
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {} in the model, {} in the data", short(a), short(b))),
        _ => {}
    }
}

/// A value for a message: a feature's or task's name where it has one, else compact JSON.
fn short(v: &Value) -> String {
    match v.get("name").and_then(Value::as_str) {
        Some(name) => format!("`{name}`"),
        None => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{SequenceItemSpec, SequenceSpec};
    use feature_encoders::{DenseFeature, FeatureSchema, SparseFeature};

    fn schema() -> DataSchema {
        let dense = |n: &str| DenseFeature { name: n.into(), missing_indicator: false };
        DataSchema {
            features: FeatureSchema {
                dense: vec![dense("a"), dense("b")],
                sparse: vec![SparseFeature::new("s", 10), SparseFeature::new("t", 20)],
                ..FeatureSchema::default()
            },
            sequence: Some(SequenceSpec {
                max_len: 5,
                num_action_types: 4,
                items: SequenceItemSpec::Ids { cardinality: 50, dim: 8 },
            }),
            tasks: vec!["save".into()],
        }
    }

    #[test]
    fn lists_each_difference() {
        let model = schema();
        assert!(model.differences(&model, true).is_empty());
        let mut data = schema();
        data.features.dense.swap(0, 1);
        data.features.sparse[1].cardinality = 21;
        data.sequence.as_mut().unwrap().max_len = 6;
        data.tasks = vec!["click".into()];
        let d = model.differences(&data, true);
        assert_eq!(
            d,
            [
                "features.dense[0].name: \"a\" in the model, \"b\" in the data",
                "features.dense[1].name: \"b\" in the model, \"a\" in the data",
                "features.sparse[1].cardinality: 20 in the model, 21 in the data",
                "sequence.max_len: 5 in the model, 6 in the data",
                "tasks[0]: \"save\" in the model, \"click\" in the data",
            ],
            "{d:#?}"
        );
        assert_eq!(model.differences(&data, false).len(), 4);
        let mut fewer = schema();
        fewer.features.sparse.pop();
        assert_eq!(model.differences(&fewer, true), ["features.sparse[1]: `t` in the model, absent from the data"]);
        let mut config = ranker_model::presets::preset("dcnv2").unwrap();
        model.apply(&mut config).unwrap();
        let err = DataSchema::check_fits_model(&data, &config, "eval", true).unwrap_err().to_string();
        assert!(err.contains("(5 differences)") && err.contains("sequence.max_len"), "{err}");
        assert!(DataSchema::check_fits_model(&model, &config, "eval", true).is_ok());
    }
}
