//! Shared helpers of the end-to-end tests: small synthetic data and a tiny architecture.

#![allow(dead_code)]

pub mod cli;

use std::path::Path;

use rankstack::data::synthetic::{self, SyntheticSpec};
use rankstack::data::ParquetDataset;
use rankstack::ranker_model::RankerConfig;
pub use rankstack_nn::testing::ScratchDir;

/// A fresh temporary directory for one test, removed when it is dropped (kept if the test fails).
pub fn tmpdir(tag: &str) -> ScratchDir {
    ScratchDir::new(&format!("test-{tag}"))
}

/// The default synthetic world (200 users in 10 segments, 200 items in 10 categories), whose planted
/// interactions are learnable from a few thousand rows.
pub fn small_world(rows: usize, stream: u64) -> SyntheticSpec {
    SyntheticSpec { rows, stream, ..SyntheticSpec::default() }
}

/// Writes training (stream 0) and evaluation (stream 1) files into `dir`.
pub fn write_data(dir: &Path, train_rows: usize, eval_rows: usize) -> (ParquetDataset, ParquetDataset) {
    synthetic::generate(&small_world(train_rows, 0), dir.join("train.parquet")).unwrap();
    synthetic::generate(&small_world(eval_rows, 1), dir.join("eval.parquet")).unwrap();
    (ParquetDataset::open(dir.join("train.parquet")).unwrap(), ParquetDataset::open(dir.join("eval.parquet")).unwrap())
}

/// A tiny architecture with every random component on (MaskNet dropout, MLP dropout, the
/// sequence encoder's dropout and training time window), fitted to `data`.
pub fn tiny_config(data: &ParquetDataset) -> RankerConfig {
    let mut config = RankerConfig::from_toml_str(TINY).unwrap();
    data.schema().apply(&mut config).unwrap();
    config
}

const TINY: &str = r#"
[features]
[sequence]
action_dim = 4
num_heads = 2
ff_dim = 8
num_output_positions = 2
dropout = 0.1
[[backbone]]
type = "parallel_masknet"
config = { num_blocks = 2, block = { output_dim = 16, dropout = 0.1 } }
[[backbone]]
type = "crossnet"
config = { num_layers = 2, layer = { type = "full_rank" } }
[mlp]
dims = [16]
dropout = 0.1
[[tasks]]
name = "save"
"#;

/// The bytes of the model file of a run's latest checkpoint.
pub fn latest_weights(run: &Path) -> Vec<u8> {
    let dir = rankstack::train::latest_checkpoint(run).unwrap().expect("a checkpoint");
    std::fs::read(dir.join("model.safetensors")).unwrap()
}
