//! Saving and loading checkpoints: identical scores after a round trip, every mismatch reported,
//! corrupt files are clear errors.

mod common;

use candle_core::{DType, Device};
use ranker_model::{checkpoint, random_batch, Ranker};
use rankstack_nn::SeededVarMap;

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ranker-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
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
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_checkpoint_of_another_model_lists_every_mismatch() {
    let config = common::small();
    let store = SeededVarMap::new(0);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let dir = tmpdir("mismatch");
    checkpoint::save(&dir, &ranker, &store).unwrap();
    // Same file, different config: MLP width 8 → 9 and the "hide" task renamed "close".
    let other = common::SMALL.replace("dims = [8]", "dims = [9]").replace("name = \"hide\"", "name = \"close\"");
    std::fs::write(
        dir.join(checkpoint::CONFIG_FILE),
        serde_json::to_string(&ranker_model::RankerConfig::from_toml_str(&other).unwrap()).unwrap(),
    )
    .unwrap();
    let e = checkpoint::load(&dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
    for needle in [
        "`mlp.layers.0.weight` has shape",
        "missing tensor `heads.close.logit.weight`",
        "unexpected tensor `heads.hide.logit.weight`",
    ] {
        assert!(e.contains(needle), "{needle}\n{e}");
    }
    std::fs::remove_dir_all(&dir).ok();
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
    std::fs::remove_dir_all(&dir).ok();
}
