//! The peer variants reached from a ranker config: TransAct's options and the
//! `torch.nn.TransformerEncoder` options in `[sequence]`, Twitter's truncation and per-block
//! configs in a `parallel_masknet` stage. The model builds, the cost planner counts its parameters
//! exactly, it trains (finite loss and gradients) and a checkpoint round trip scores identically.

use candle_core::{DType, Device};
use ranker_model::{checkpoint, random_batch, random_labels, Ranker, RankerConfig};
use rankstack_nn::SeededVarMap;

const VARIANTS: &str = r#"
[features]
dense = [{ name = "age" }, { name = "ctr" }]
sparse = [{ name = "country", cardinality = 10, dim = 4 }]

[sequence]
max_len = 5
num_action_types = 5
action_vocab = [2, 1, 4, 3]
action_dim = 4
item_dim = 4
fusion = "none"
num_heads = 2
ff_dim = 8
dropout = 0.0
max_pool = "all_positions"
future_mask = "after"
all_output_positions = true
num_output_positions = 0
activation = "gelu"
bias = false
final_norm = true
time_window_sampling = "per_batch_days"
time_window_ms = 172800000.0

[[backbone]]
type = "parallel_masknet"
config = { blocks = [
  { output_dim = 6, projection_ratio = 1.25, aggregation_rounding = "truncate", hidden_bias = true, activation = "identity" },
  { output_dim = 4, input_layer_norm = true },
] }

[mlp]
dims = [8]

[[tasks]]
name = "save"
"#;

fn build(seed: u64) -> (RankerConfig, SeededVarMap, Ranker) {
    let config = RankerConfig::from_toml_str(VARIANTS).unwrap();
    let store = SeededVarMap::new(seed);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    (config, store, ranker)
}

#[test]
fn a_ranker_with_every_variant_builds_counts_and_trains() {
    let (config, store, ranker) = build(3);
    let seq = config.sequence.as_ref().unwrap();
    // d = 4 + 4 = 8; output (S + 1)·d = 48.
    assert_eq!((seq.model_dim(), seq.output_dim()), (8, 48));
    let real: usize = store.named_vars().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(ranker.cost(4).total().params, real);
    assert!(store.named_vars().iter().all(|(n, _)| !n.starts_with("sequence.encoder.layers.0.linear1.bias")));
    let batch = random_batch(&config, 6, 1).unwrap();
    let logits = ranker.forward_t(&batch, true).unwrap();
    let loss = ranker.loss(&logits, &random_labels(&config, 6, 2).unwrap(), None).unwrap();
    let grads = loss.backward().unwrap();
    let finite =
        |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite());
    assert!(finite(&loss.reshape(1).unwrap()));
    for (name, var) in store.named_vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            assert!(finite(g), "{name}");
        }
    }
}

#[test]
fn a_variant_checkpoint_round_trips() {
    let (config, store, ranker) = build(5);
    let scratch = rankstack_nn::testing::ScratchDir::new("ranker-variants");
    let dir = scratch.join("checkpoint");
    checkpoint::save(&dir, &ranker, &store).unwrap();
    let (loaded, _) = checkpoint::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), &config);
    let serving = checkpoint::load_for_serving(&dir, DType::F32, &Device::Cpu).unwrap();
    let batch = random_batch(&config, 5, 9).unwrap();
    let a = ranker.predict(&batch).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(a, loaded.predict(&batch).unwrap().to_vec2::<f32>().unwrap());
    assert_eq!(a, serving.predict(&batch).unwrap().to_vec2::<f32>().unwrap());
}

#[test]
fn invalid_variant_combinations_fail_when_the_ranker_is_built() {
    let bad = VARIANTS.replace("action_vocab = [2, 1, 4, 3]", "action_vocab = [2, 1, 4]");
    let config = RankerConfig::from_toml_str(&bad);
    let msg = match config {
        Err(e) => e.to_string(),
        Ok(c) => Ranker::new(&c, SeededVarMap::new(0).var_builder(DType::F32, &Device::Cpu)).unwrap_err().to_string(),
    };
    assert!(msg.contains("num_action_types") && msg.contains("action_vocab lists 3 ids"), "{msg}");
    let both = VARIANTS.replace("config = { blocks = [", "config = { num_blocks = 3, blocks = [");
    let msg = match RankerConfig::from_toml_str(&both) {
        Err(e) => e.to_string(),
        Ok(c) => Ranker::new(&c, SeededVarMap::new(0).var_builder(DType::F32, &Device::Cpu)).unwrap_err().to_string(),
    };
    assert!(msg.contains("num_blocks") && msg.contains("lists 2 blocks"), "{msg}");
}
