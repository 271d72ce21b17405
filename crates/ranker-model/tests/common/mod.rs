//! A small ranker config shared by the tests (every component present, widths tiny).

#![allow(dead_code)]

use ranker_model::RankerConfig;

pub const SMALL: &str = r#"
input_skip = true

[features]
dense = [{ name = "age" }, { name = "price", missing_indicator = true }, { name = "ctr" }]
sparse = [{ name = "country", cardinality = 10, dim = 4 }, { name = "topic", cardinality = 7, dim = 3, oov = "hash" }]
embedding = [{ name = "pin", dim = 5, projection = 4 }]

[sequence]
max_len = 4
num_action_types = 5
action_dim = 4
item_dim = 4
num_heads = 2
ff_dim = 8
num_output_positions = 2
dropout = 0.0

[[backbone]]
type = "parallel_masknet"
config = { num_blocks = 2, block = { output_dim = 6 } }

[[backbone]]
type = "crossnet"
config = { num_layers = 2, layer = { type = "full_rank" } }
input_dim = 12

[mlp]
dims = [8]

[[tasks]]
name = "save"

[[tasks]]
name = "hide"
weight = 0.5
tower = { dims = [3] }
negative_sampling_rate = 0.25
"#;

pub fn small() -> RankerConfig {
    RankerConfig::from_toml_str(SMALL).unwrap()
}
