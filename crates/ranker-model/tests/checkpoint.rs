//! Saving and loading checkpoints: identical scores after a round trip, every mismatch reported,
//! corrupt files are clear errors.

mod common;

use std::ops::Deref;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ranker_model::{checkpoint, random_batch, Ranker};
use rankstack_nn::testing::ScratchDir;
use rankstack_nn::SeededVarMap;

/// A checkpoint path (not yet created) in a scratch directory that is removed when this is dropped.
struct CheckpointPath {
    path: PathBuf,
    _scratch: ScratchDir,
}

impl Deref for CheckpointPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for CheckpointPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

fn tmpdir(tag: &str) -> CheckpointPath {
    let scratch = ScratchDir::new(&format!("ranker-ckpt-{tag}"));
    CheckpointPath { path: scratch.join("checkpoint"), _scratch: scratch }
}

#[test]
fn round_trip_scores_identically_including_buffers() {
    let config = common::small();
    let store = SeededVarMap::new(11);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    // A training-mode pass moves the BatchNorm running statistics away from their initial values.
    ranker.forward_t(&random_batch(&config, 16, 1).unwrap(), true).unwrap();
    let dir = tmpdir("roundtrip");
    checkpoint::save(&dir, &ranker, &store).unwrap();
    let (loaded, _) = checkpoint::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let batch = random_batch(&config, 5, 2).unwrap();
    let a = ranker.predict(&batch).unwrap().to_vec2::<f32>().unwrap();
    let b = loaded.predict(&batch).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(a, b);
}

/// A checkpoint directory whose weights do not fit its config: MLP width 8 → 9 and the "hide"
/// task renamed "close". Both loaders must list all three problems at once.
fn mismatched_checkpoint(tag: &str) -> CheckpointPath {
    let config = common::small();
    let store = SeededVarMap::new(0);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let dir = tmpdir(tag);
    checkpoint::save(&dir, &ranker, &store).unwrap();
    let other = common::SMALL.replace("dims = [8]", "dims = [9]").replace("name = \"hide\"", "name = \"close\"");
    std::fs::write(
        dir.join(checkpoint::CONFIG_FILE),
        serde_json::to_string(&ranker_model::RankerConfig::from_toml_str(&other).unwrap()).unwrap(),
    )
    .unwrap();
    dir
}

fn assert_lists_every_mismatch(e: &str) {
    for needle in [
        "`mlp.layers.0.weight` has shape",
        "missing tensor `heads.close.logit.weight`",
        "unexpected tensor `heads.hide.logit.weight`",
    ] {
        assert!(e.contains(needle), "{needle}\n{e}");
    }
}

#[test]
fn a_checkpoint_of_another_model_lists_every_mismatch() {
    let dir = mismatched_checkpoint("mismatch");
    assert_lists_every_mismatch(&checkpoint::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string());
}

#[test]
fn corrupt_or_missing_files_are_clear_errors() {
    let config = common::small();
    let store = SeededVarMap::new(0);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let dir = tmpdir("corrupt");
    checkpoint::save(&dir, &ranker, &store).unwrap();
    let weights = dir.join(checkpoint::WEIGHTS_FILE);
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = checkpoint::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "{e}");
    std::fs::write(dir.join(checkpoint::CONFIG_FILE), "{ not json").unwrap();
    let e = checkpoint::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    let e = checkpoint::load(dir.join("nowhere"), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("nowhere"), "{e}");
}

#[test]
fn a_repeated_tensor_name_is_an_error_not_a_panic() {
    let dir = tmpdir("repeated");
    std::fs::create_dir_all(&dir).unwrap();
    let t = candle_core::Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let e =
        checkpoint::write_safetensors(&dir.join("x.safetensors"), &[("a".into(), t.clone()), ("a".into(), t)], None)
            .unwrap_err()
            .to_string();
    assert!(e.contains("`a` appears twice"), "{e}");
    assert!(!dir.join("x.safetensors").exists());
}

#[test]
fn serving_load_scores_identically_without_a_backward_graph() {
    let config = common::small();
    let store = SeededVarMap::new(5);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    ranker.forward_t(&random_batch(&config, 16, 1).unwrap(), true).unwrap(); // move the BatchNorm buffers
    let dir = tmpdir("serving");
    checkpoint::save(&dir, &ranker, &store).unwrap();
    let served = checkpoint::load_for_serving(&dir, DType::F32, &Device::Cpu).unwrap();
    let batch = random_batch(&config, 7, 3).unwrap();
    let trained = ranker.predict(&batch).unwrap();
    let frozen = served.predict(&batch).unwrap();
    assert_eq!(trained.to_vec2::<f32>().unwrap(), frozen.to_vec2::<f32>().unwrap());
    // The trainable model records the graph (it holds every intermediate); the served one does not.
    assert!(trained.track_op());
    assert!(!frozen.track_op());
}

#[test]
fn packed_serving_scores_match_f32_and_bf16_stays_within_5e_3() {
    use rankstack_nn::packed_matmul::{packed_kernel_available, WeightPrecision};
    use rankstack_nn::LinearLayers;
    let config = common::small();
    let store = SeededVarMap::new(6);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    ranker.forward_t(&random_batch(&config, 16, 1).unwrap(), true).unwrap();
    let dir = tmpdir("packed");
    checkpoint::save(&dir, &ranker, &store).unwrap();
    let batch = random_batch(&config, 40, 4).unwrap();
    let want = ranker.predict(&batch).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (precision, tolerance) in [(WeightPrecision::F32, 1e-6), (WeightPrecision::Bf16, 5e-3)] {
        let mut served = checkpoint::load_packed_for_serving(&dir, precision).unwrap();
        let layers = served.linear_layers_mut();
        // Encoder projection, 2 transformer layers × 6 (Q, K, V, output, 2 feed-forward) +
        // pooling, 2 mask blocks × 3, 2 cross layers, the MLP layer, and the heads (1 + tower 1 + 1).
        assert_eq!(layers.len(), 26);
        let packed = precision == WeightPrecision::Bf16 || packed_kernel_available(precision);
        assert!(layers.iter().all(|l| l.packed().is_some() == packed), "{precision:?}");
        let got = served.predict(&batch).unwrap();
        assert!(!got.track_op());
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= tolerance, "{precision:?}: max |Δp| {worst} > {tolerance}");
        if precision == WeightPrecision::Bf16 {
            assert!(worst > 0.0, "bf16 rounding must show");
        }
    }
}

#[test]
fn serving_load_lists_every_mismatch() {
    let dir = mismatched_checkpoint("serving-mismatch");
    assert_lists_every_mismatch(&checkpoint::load_for_serving(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string());
}

#[test]
fn a_checkpoint_with_non_finite_weights_is_not_served() {
    let config = common::small();
    let store = SeededVarMap::new(3);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let (name, var) = checkpoint::state(&ranker, &store).into_iter().find(|(n, _)| n.starts_with("mlp.")).unwrap();
    var.set(&var.ones_like().unwrap().affine(f64::NAN, 0.0).unwrap()).unwrap();
    let dir = tmpdir("nonfinite");
    checkpoint::save(&dir, &ranker, &store).unwrap();
    for precision in
        [rankstack_nn::packed_matmul::WeightPrecision::F32, rankstack_nn::packed_matmul::WeightPrecision::Bf16]
    {
        let Err(err) = checkpoint::load_packed_for_serving(&dir, precision) else {
            panic!("served non-finite weights")
        };
        let err = err.to_string();
        assert!(err.contains(&format!("`{name}`")) && err.contains("non-finite values"), "{err}");
    }
}
