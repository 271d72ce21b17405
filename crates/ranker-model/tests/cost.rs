//! The cost planner's formulas against hand-worked small cases and the real parameter count.

use candle_core::{DType, Device};
use ranker_model::{Ranker, RankerConfig, TrainingCalibration};
use rankstack_nn::SeededVarMap;

fn build(toml: &str) -> (Ranker, usize) {
    let config = RankerConfig::from_toml_str(toml).unwrap();
    let store = SeededVarMap::new(0);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let params = store.named_vars().iter().map(|(_, v)| v.elem_count()).sum();
    (ranker, params)
}

const TINY: &str = r#"
[features]
dense = [{ name = "a" }, { name = "b" }]
embedding = [{ name = "e", dim = 3, projection = 2 }]
[[backbone]]
type = "crossnet"
config = { num_layers = 1, layer = { type = "full_rank" } }
[mlp]
dims = [3]
[[tasks]]
name = "t"
"#;

#[test]
fn tiny_model_by_hand() {
    // features: BatchNorm 2·2 + projection 3·2 + 2 = 12 params, 2·3·2 = 12 FLOPs; output width 4.
    // crossnet on 4: 4·4 + 4 = 20 params, 2·4·4 = 32 FLOPs.  mlp 4 → 3: 15 params, 24 FLOPs.
    // head 3 → 1: 4 params, 6 FLOPs.  Total 51 params, 74 FLOPs.
    let (ranker, real) = build(TINY);
    let cost = ranker.cost(10);
    let got: Vec<(usize, usize)> = cost.modules.iter().map(|m| (m.params, m.flops_per_candidate)).collect();
    assert_eq!(got, vec![(12, 12), (20, 32), (15, 24), (4, 6)]);
    assert_eq!(cost.total().params, 51);
    assert_eq!(real, 51);
    // Memory: parameters 4·51 bytes; training = 4·(params + grads + 2 AdamW moments) + 4·B·Σacts.
    let acts = cost.total().activations_per_candidate;
    assert_eq!(cost.parameter_bytes(), 204);
    assert_eq!(cost.training_bytes(), 4 * 204 + 4 * 10 * acts);
    assert!(cost.training_fits(cost.training_bytes(), 1.0));
    assert!(!cost.training_fits(cost.training_bytes(), 0.99));
    let max = cost.max_training_batch(cost.training_bytes(), 1.0);
    assert_eq!(max, 10);
    // A device factor counts the activations that many times, below 1 as well (a GPU's graph
    // that keeps fewer intermediates than the planner counts); a factor that is not positive and
    // finite counts them once.
    let factor = |activation_factor| TrainingCalibration { activation_factor, inputs_ahead: 0 };
    assert_eq!(cost.calibrated_training_bytes(factor(0.5)), 4 * 204 + 2 * 10 * acts);
    assert_eq!(cost.calibrated_training_bytes(factor(2.0)), 4 * 204 + 8 * 10 * acts);
    assert_eq!(cost.max_training_batch_calibrated(cost.training_bytes(), 1.0, factor(0.5)), 20);
    for odd in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_eq!(cost.calibrated_training_bytes(factor(odd)), cost.training_bytes(), "{odd}");
        assert_eq!(cost.max_training_batch_calibrated(cost.training_bytes(), 1.0, factor(odd)), 10, "{odd}");
    }
    assert_eq!(cost.calibrated_training_bytes(TrainingCalibration::UNCALIBRATED), cost.training_bytes());
    for bf16 in [false, true] {
        assert_eq!(TrainingCalibration::for_training(&Device::Cpu, bf16), TrainingCalibration::UNCALIBRATED);
    }
    // Inputs: 2 dense floats and a 3-float embedding per candidate reach the device; a batch copied
    // ahead counts them once more per candidate.
    assert_eq!(cost.input_floats_per_candidate, 5);
    assert_eq!(cost.input_bytes(), 4 * 10 * 5);
    let ahead = TrainingCalibration { activation_factor: 0.5, inputs_ahead: 1 };
    assert_eq!(cost.calibrated_training_bytes(ahead), 4 * 204 + 2 * 10 * acts + 4 * 10 * 5);
    let budget = 4 * 204 + 7 * (2 * acts + 4 * 5) + 3;
    assert_eq!(cost.max_training_batch_calibrated(budget, 1.0, ahead), 7);
}

#[test]
fn inputs_per_candidate_of_the_sequence() {
    // Pretrained item vectors: S = max_len rows of item_dim plus the candidate's; with an item
    // table only ids are read, on the host. Dense, embedding and extra features count their width.
    let vectors = SEQUENCE.replace(
        "dense = [{ name = \"a\" }]",
        "dense = [{ name = \"a\" }]\nembedding = [{ name = \"e\", dim = 6 }]\nextra = [{ name = \"x\", dim = 2 }]",
    );
    let (ranker, _) = build(&vectors);
    assert_eq!(ranker.cost(1).input_floats_per_candidate, 1 + 6 + 2 + (4 + 1) * 4);
    let ids = vectors.replace("[mlp]", "[item_embedding]\ncardinality = 50\n[mlp]");
    let (ranker, _) = build(&ids);
    assert_eq!(ranker.cost(1).input_floats_per_candidate, 1 + 6 + 2);
}

#[test]
fn mask_block_and_low_rank_and_mixture_by_hand() {
    // Input width 4 (4 dense features, no BatchNorm). MaskBlock m = z = 4, t = round(2·4) = 8, q = 3:
    // params 4·8 + 8 + 8·4 + 4 + 4·3 + 2·3 (LN) = 94, FLOPs 2·(32 + 32 + 12) = 152 (one block).
    // Then a low-rank crossnet on 3, r = 2, 2 layers: params 2·(2·2·3 + 3) = 30, FLOPs 2·4·2·3 = 48.
    // Then a mixture on 3 with E = 2, r = 1, 1 layer: params 2·(2·1·3 + 1) + 2·3 + 3 = 23,
    // FLOPs 2·(4·1·3 + 2·1) + 2·3·2 = 40.
    let toml = r#"
[features]
dense = [{ name = "a" }, { name = "b" }, { name = "c" }, { name = "d" }]
dense_pipeline = { batch_norm = false }
[[backbone]]
type = "parallel_masknet"
config = { num_blocks = 1, block = { output_dim = 3 } }
[[backbone]]
type = "crossnet"
config = { num_layers = 2, layer = { type = "low_rank", rank = 2 } }
[[backbone]]
type = "crossnet"
config = { num_layers = 1, layer = { type = "mixture", rank = 1, num_experts = 2 } }
[mlp]
dims = [2]
[[tasks]]
name = "t"
"#;
    let (ranker, real) = build(toml);
    let cost = ranker.cost(1);
    let got: Vec<(usize, usize)> = cost.modules[1..4].iter().map(|m| (m.params, m.flops_per_candidate)).collect();
    assert_eq!(got, vec![(94, 152), (30, 48), (23, 40)]);
    assert_eq!(cost.total().params, real);
}

/// One dense feature and a one-layer sequence encoder over pretrained item vectors.
const SEQUENCE: &str = r#"
[features]
dense = [{ name = "a" }]
[sequence]
max_len = 4
num_action_types = 5
action_dim = 4
item_dim = 4
num_layers = 1
num_heads = 2
ff_dim = 8
num_output_positions = 1
[mlp]
dims = [2]
[[tasks]]
name = "t"
"#;

#[test]
fn sequence_encoder_by_hand() {
    // d = 4 + 2·4 = 12, S = 4 tokens, 2 heads, ff 8, 1 layer, K = 1.
    // Params: action table 5·4 = 20; layer: in_proj 3·144 + 36, out_proj 144 + 12, linear1 96 + 8,
    // linear2 96 + 12, two norms 48 → 884; pool projection 156. Total 1060.
    // FLOPs: qkv 2·4·3·144 = 3456, scores and weighted sum 2·2·4·4·12 = 768, out_proj 2·4·144 = 1152,
    // feed-forward 2·2·4·12·8 = 1536, pool projection 2·144 = 288. Total 7200.
    let (ranker, real) = build(SEQUENCE);
    let cost = ranker.cost(1);
    assert_eq!(
        (cost.modules[1].name.as_str(), cost.modules[1].params, cost.modules[1].flops_per_candidate),
        ("sequence", 1060, 7200)
    );
    assert_eq!(cost.total().params, real);
}
