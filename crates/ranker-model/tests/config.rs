//! Config parsing and construction errors.

mod common;

use candle_core::{DType, Device};
use ranker_model::{Ranker, RankerConfig};
use rankstack_nn::SeededVarMap;

fn build_err(config: &RankerConfig) -> String {
    let store = SeededVarMap::new(0);
    Ranker::new(config, store.var_builder(DType::F32, &Device::Cpu)).unwrap_err().to_string()
}

#[test]
fn toml_and_json_round_trip() {
    let config = common::small();
    assert_eq!(RankerConfig::from_toml_str(&config.to_toml_string()).unwrap(), config);
    assert_eq!(RankerConfig::from_json_str(&serde_json::to_string(&config).unwrap()).unwrap(), config);
    for name in ranker_model::presets::NAMES {
        let preset = ranker_model::presets::preset(name).unwrap();
        assert_eq!(RankerConfig::from_toml_str(&preset.to_toml_string()).unwrap(), preset, "{name}");
    }
}

#[test]
fn unknown_keys_are_rejected_with_their_name() {
    for (from, to, key) in [
        ("input_skip = true", "input_skip = true\nlearning_rate = 1", "learning_rate"),
        ("dims = [8]", "dims = [8]\nwidth = 3", "width"),
        ("name = \"save\"", "name = \"save\"\nweigth = 2", "weigth"),
        ("max_len = 4", "max_len = 4\nheads = 2", "heads"),
        ("input_dim = 12", "input_dim = 12\nlayers = 2", "layers"),
        ("block = { output_dim = 6 }", "block = { output_dim = 6, ratio = 2 }", "ratio"),
    ] {
        let text = common::SMALL.replacen(from, to, 1);
        let err = RankerConfig::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
    let json = serde_json::to_string(&common::small()).unwrap().replacen("{", "{\"extra_key\":1,", 1);
    assert!(RankerConfig::from_json_str(&json).unwrap_err().to_string().contains("extra_key"));
}

#[test]
fn bad_configs_name_the_offending_field() {
    let mut c = common::small();
    c.tasks.clear();
    assert!(build_err(&c).contains("`tasks`"));

    let mut c = common::small();
    c.tasks[1].name = "save".into();
    let e = build_err(&c);
    assert!(e.contains("`tasks[1].name`") && e.contains("duplicate"), "{e}");

    let mut c = common::small();
    c.tasks[0].weight = -1.0;
    assert!(build_err(&c).contains("`tasks[0].weight`"));

    let mut c = common::small();
    c.tasks[1].negative_sampling_rate = Some(0.0);
    assert!(build_err(&c).contains("`tasks[1].negative_sampling_rate`"));

    // The second stage declares an input width the first does not produce.
    let text = common::SMALL.replace("input_dim = 12", "input_dim = 13");
    let e = build_err(&RankerConfig::from_toml_str(&text).unwrap());
    assert!(e.contains("`backbone[1].input_dim`") && e.contains("13") && e.contains("12"), "{e}");

    // A layer-level error is re-addressed to its place in the ranker config.
    let text = common::SMALL.replace("num_layers = 2, layer", "num_layers = 0, layer");
    let e = build_err(&RankerConfig::from_toml_str(&text).unwrap());
    assert!(e.contains("`backbone[1].config.num_layers`"), "{e}");
    let text = common::SMALL.replace("dims = [8]", "dims = [0]");
    assert!(build_err(&RankerConfig::from_toml_str(&text).unwrap()).contains("`mlp.dims[0]`"));
    let text = common::SMALL.replace("num_heads = 2", "num_heads = 5");
    assert!(build_err(&RankerConfig::from_toml_str(&text).unwrap()).contains("`sequence.num_heads`"));
    let text = common::SMALL.replace("tower = { dims = [3] }", "tower = { dims = [] }");
    assert!(build_err(&RankerConfig::from_toml_str(&text).unwrap()).contains("`tasks[1].tower.dims`"));
}

#[test]
fn a_missing_or_unexpected_sequence_batch_is_an_error() {
    let config = common::small();
    let store = SeededVarMap::new(0);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let mut batch = ranker_model::random_batch(&config, 3, 0).unwrap();
    batch.sequence = None;
    let e = ranker.forward(&batch).unwrap_err().to_string();
    assert!(e.contains("Ranker") && e.contains("sequence"), "{e}");
}
