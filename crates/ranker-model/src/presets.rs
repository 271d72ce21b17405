//! Named model configurations.
//!
//! All presets share the Homefeed-like feature set of the `homefeed-bench` model: 64 dense features
//! (signed log1p → BatchNorm → clamp ±5), 16 single-valued sparse features of cardinality 100 000
//! and width 32, 2 pretrained 256-wide embedding features, all L2-normalised, and a TransAct
//! sequence encoder (S = 100, 20 action types, widths 32, concat fusion d = 96, 2 layers, 2 heads,
//! feed-forward 32, K = 10 → 1056 columns): 2144 encoded columns. Heads: save, click, closeup, hide.
//!
//! | preset | backbone | input skip | MLP |
//! |---|---|---|---|
//! | `pinterest-homefeed` | parallel MaskNet 3 × 512 (ratio 2.0), then 4 full-rank DCNv2 | no | 512, 256 |
//! | `pinterest-baseline` | 4 full-rank DCNv2 | yes | 1024, 512, 256 |
//! | `dcnv2` | 4 full-rank DCNv2 | no | 512, 256 |
//! | `masknet-parallel` | parallel MaskNet 3 × 512 | no | 512, 256 |
//! | `masknet-serial` | serial MaskNet 3 × 512 | no | 512, 256 |
//! | `mlp` | none | — | 1024, 512, 256 |
//! | `homefeed-bench` | the `pinterest-homefeed` model under its benchmark name | no | 512, 256 |
//!
//! `homefeed-bench` is the model that `cargo xtask bench-compare` and the criterion benches time
//! against PyTorch (about 120M parameters, 51M of them in embedding tables, and 162 MFLOP per
//! candidate, 117 of them in MaskNet). It is its own name so that the benchmark stays fixed if
//! `pinterest-homefeed` ever follows a newer paper.
//!
//! Each is a plain [`RankerConfig`]; `RankerConfig::to_toml_string` prints it as a starting point
//! for a custom config.

use dcnv2::CrossNetConfig;
use feature_encoders::{DenseFeature, EmbeddingFeature, FeatureSchema, SparseFeature};
use masknet::{MaskBlockConfig, ParallelMaskNetConfig, SerialMaskNetConfig};
use rankstack_nn::{Error, MlpConfig, Result};
use sequence_transformer::SequenceTransformerConfig;

use crate::{RankerConfig, StageConfig, TaskConfig};

/// Preset names, in the order `rankstack presets` lists them.
pub const NAMES: [&str; 7] = [
    "pinterest-homefeed",
    "pinterest-baseline",
    "dcnv2",
    "masknet-parallel",
    "masknet-serial",
    "mlp",
    "homefeed-bench",
];

/// The task heads of every preset.
pub const TASKS: [&str; 4] = ["save", "click", "closeup", "hide"];

/// The shared Homefeed-like feature schema (without the sequence block).
pub fn homefeed_features() -> FeatureSchema {
    FeatureSchema {
        dense: (0..64).map(|i| DenseFeature { name: format!("dense_{i:02}"), missing_indicator: false }).collect(),
        sparse: (0..16)
            .map(|i| SparseFeature { dim: Some(32), ..SparseFeature::new(format!("sparse_{i:02}"), 100_000) })
            .collect(),
        embedding: ["pin_embedding", "user_embedding"]
            .iter()
            .map(|n| EmbeddingFeature {
                name: n.to_string(),
                dim: 256,
                projection: None,
                projection_bias: true,
                normalize: true,
            })
            .collect(),
        ..FeatureSchema::default()
    }
}

/// TransAct as published, with a 20-type action vocabulary.
pub fn homefeed_sequence() -> SequenceTransformerConfig {
    SequenceTransformerConfig { num_action_types: 20, ..SequenceTransformerConfig::default() }
}

fn stage_masknet_parallel() -> StageConfig {
    StageConfig::ParallelMasknet { config: ParallelMaskNetConfig::paper(), input_dim: None }
}

fn stage_dcnv2() -> StageConfig {
    StageConfig::Crossnet { config: CrossNetConfig::full_rank(4), input_dim: None }
}

fn config(backbone: Vec<StageConfig>, input_skip: bool, mlp: &[usize]) -> RankerConfig {
    RankerConfig {
        features: homefeed_features(),
        sequence: Some(homefeed_sequence()),
        item_embedding: None,
        backbone,
        input_skip,
        mlp: MlpConfig::relu(mlp.to_vec()),
        tasks: TASKS.iter().map(|t| TaskConfig::new(*t)).collect(),
    }
}

/// The preset called `name` (see [`NAMES`]); an unknown name is an error listing the valid ones.
pub fn preset(name: &str) -> Result<RankerConfig> {
    Ok(match name {
        "pinterest-homefeed" | "homefeed-bench" => {
            config(vec![stage_masknet_parallel(), stage_dcnv2()], false, &[512, 256])
        }
        "pinterest-baseline" => config(vec![stage_dcnv2()], true, &[1024, 512, 256]),
        "dcnv2" => config(vec![stage_dcnv2()], false, &[512, 256]),
        "masknet-parallel" => config(vec![stage_masknet_parallel()], false, &[512, 256]),
        "masknet-serial" => config(
            vec![StageConfig::SerialMasknet {
                config: SerialMaskNetConfig { blocks: vec![MaskBlockConfig::new(512); 3] },
                input_dim: None,
            }],
            false,
            &[512, 256],
        ),
        "mlp" => config(vec![], false, &[1024, 512, 256]),
        other => {
            return Err(Error::config(
                "presets",
                "name",
                format!("unknown preset `{other}`; known: {}", NAMES.join(", ")),
            ))
        }
    })
}

/// The cost planner's report for every preset, as the Markdown document `docs/cost-planner.md`
/// (kept in sync by a test): parameters, FLOPs per candidate and activations per module, and
/// whether one training step at `batch_size` fits in `fraction` of a `device_gib` GiB device.
pub fn cost_document(batch_size: usize, device_gib: f64, fraction: f64) -> Result<String> {
    use std::fmt::Write;
    let device_bytes = (device_gib * (1u64 << 30) as f64) as usize;
    let mut doc = String::new();
    let _ = writeln!(doc, "# Cost planner: the presets\n");
    let _ = writeln!(
        doc,
        "Generated by `cargo run --example cost_report` (a test keeps it in sync with the code). \
         Conventions: see `crates/ranker-model/src/cost.rs`. Float32, batch size {batch_size}, \
         device memory {device_gib} GiB, budget {:.0}% (the paper targets about 60%).\n",
        fraction * 100.0
    );
    for name in NAMES {
        let config = preset(name)?;
        let store = rankstack_nn::SeededVarMap::new(0);
        let ranker =
            crate::Ranker::new(&config, store.var_builder(candle_core::DType::F32, &candle_core::Device::Cpu))?;
        let report = ranker.cost(batch_size);
        let _ = writeln!(doc, "## `{name}`\n\n{report}");
        let verdict = if report.training_fits(device_bytes, fraction) { "fits" } else { "does not fit" };
        let _ = writeln!(
            doc,
            "Training at batch {batch_size} {verdict} in {:.0}% of {device_gib} GiB; the largest batch that fits is {}.\n",
            fraction * 100.0,
            report.max_training_batch(device_bytes, fraction)
        );
    }
    Ok(doc)
}
