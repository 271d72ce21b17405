//! Every preset builds, its cost report's parameter count equals the real model's, and the
//! Pinterest model has the published shape. The whole `pinterest-homefeed` preset passes the
//! gradient-flow check.

use candle_core::{DType, Device};
use ranker_model::{presets, random_batch, random_labels, Ranker};
use rankstack_nn::testing::assert_all_params_get_gradients;
use rankstack_nn::SeededVarMap;

fn build(name: &str) -> (Ranker, SeededVarMap) {
    let config = presets::preset(name).unwrap();
    let store = SeededVarMap::new(0);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    (ranker, store)
}

fn real_params(store: &SeededVarMap) -> usize {
    store.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
}

#[test]
fn every_preset_builds_and_the_planner_counts_its_parameters_exactly() {
    for name in presets::NAMES {
        let (ranker, store) = build(name);
        let cost = ranker.cost(512);
        assert_eq!(cost.total().params, real_params(&store), "{name}\n{cost}");
        assert_eq!(ranker.task_names(), presets::TASKS, "{name}");
        assert_eq!(ranker.encoder().output_dim(), 2144, "{name}");
    }
    assert!(presets::preset("nope").unwrap_err().to_string().contains("pinterest-homefeed"));
}

/// The heading of the hand-written section of `docs/cost-planner.md`.
const CALIBRATION: &str = "## Calibration against measured memory";

#[test]
fn the_cost_document_is_up_to_date() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/cost-planner.md");
    let want = presets::cost_document(512, 80.0, 0.6).unwrap();
    let have = std::fs::read_to_string(path).unwrap_or_default();
    // The generated report, then the hand-written calibration against measured memory.
    let (generated, rest) = have.split_at(have.find(CALIBRATION).unwrap_or(have.len()));
    assert!(
        generated == want,
        "docs/cost-planner.md is stale: regenerate its first part with `cargo run --example cost_report` \
         (keep the `{CALIBRATION}` section after it)"
    );
    assert!(rest.starts_with(CALIBRATION), "docs/cost-planner.md has no `{CALIBRATION}` section");
}

#[test]
fn pinterest_homefeed_has_the_published_shape() {
    let (ranker, store) = build("pinterest-homefeed");
    let cost = ranker.cost(512);
    let total = cost.total();
    // About 120M parameters, 51.2M of them in the 16 embedding tables (16 x (100 000 + 1 reserved
    // out-of-vocabulary row) x 32), plus the dense BatchNorm's 2 x 64.
    assert_eq!(cost.modules[0].params, 16 * 100_001 * 32 + 2 * 64);
    println!("{cost}");
    assert!((115_000_000..125_000_000).contains(&total.params), "{}", total.params);
    assert_eq!(total.params, real_params(&store));
    // About 162 MFLOP per candidate, 117 of them in MaskNet: per block 2·(2144·4288·2 + 2144·512).
    let masknet = &cost.modules[2];
    assert_eq!(masknet.flops_per_candidate, 3 * 2 * (2144 * 4288 * 2 + 2144 * 512));
    assert!((160e6..165e6).contains(&(total.flops_per_candidate as f64)), "{}", total.flops_per_candidate);
    assert!(!ranker.config().input_skip);
}

#[test]
fn every_parameter_of_pinterest_homefeed_gets_a_finite_nonzero_gradient() {
    let (ranker, store) = build("pinterest-homefeed");
    let batch = random_batch(ranker.config(), 8, 1).unwrap();
    let labels = random_labels(ranker.config(), 8, 2).unwrap();
    let logits = ranker.forward_t(&batch, true).unwrap();
    assert_eq!(logits.dims(), &[8, 4]);
    let grads = ranker.loss(&logits, &labels, None).unwrap().backward().unwrap();
    assert_all_params_get_gradients(&store, &grads);
}
