//! torchrec's own cross networks (`fixtures/torchrec/`, written by
//! `reference/rankstack_ref/cases_torchrec.py` from the pinned torchrec's `CrossNet`,
//! `LowRankCrossNet`, `LowRankMixtureCrossNet` and `VectorCrossNet`): their state dicts imported
//! with `from_torchrec_state_dict` give a `CrossNet` whose forward values, input gradients and
//! every parameter gradient match torchrec's.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use dcnv2::{from_torchrec_state_dict, load_cross_net, save_cross_net, CrossNet, CrossNetConfig};
use rankstack_nn::checkpoint::read_safetensors;
use rankstack_nn::testing::{assert_close, check_reference, fixture_paths, fixtures_root, Fixture};

fn input_dim(fixture: &Fixture) -> usize {
    fixture.meta("input_dim").expect("input_dim").parse().expect("usize")
}

fn check(path: &std::path::Path, dtype: DType, rtol: f64) {
    let peer = Fixture::load(path).unwrap();
    let (d, config): (usize, CrossNetConfig) = (input_dim(&peer), peer.config());
    let fixture = peer.with_imported_params(|state| from_torchrec_state_dict(d, &config, state)).unwrap();
    check_reference(&fixture, dtype, rtol, |vb| CrossNet::new(d, &config, vb), |m, i| m.forward(&i["x"]));
}

/// float64: the same products in another order (see `reference.rs`).
#[test]
fn imported_torchrec_modules_match_in_f64() {
    let paths = fixture_paths("torchrec");
    assert_eq!(paths.len(), 6, "one fixture per torchrec case");
    for path in paths {
        check(&path, DType::F64, 1e-10);
    }
}

/// float32 round-off, as in `reference.rs`.
#[test]
fn imported_torchrec_modules_match_in_f32() {
    for path in fixture_paths("torchrec") {
        check(&path, DType::F32, 1e-5);
    }
}

/// The user's path: the float32 state dict torchrec saved (`save_file(module.state_dict())`),
/// imported, written as a checkpoint, loaded back: scores torchrec's inputs as torchrec did.
#[test]
fn saved_state_dicts_import_into_checkpoints_that_score_like_torchrec() {
    let out = rankstack_nn::testing::ScratchDir::new("torchrec-import");
    for path in fixture_paths("torchrec") {
        let fixture = Fixture::load(&path).unwrap();
        let (d, config): (usize, CrossNetConfig) = (input_dim(&fixture), fixture.config());
        let state_dict = fixtures_root().join("torchrec/state_dicts").join(path.file_name().unwrap());
        let tensors = from_torchrec_state_dict(d, &config, read_safetensors(&state_dict).unwrap().tensors).unwrap();
        let dir = out.join(fixture.name());
        save_cross_net(&dir, d, &config, &tensors, fixture.meta("peer"), false).unwrap();
        let (net, _) = load_cross_net(&dir, DType::F32, &Device::Cpu).unwrap();
        let x = fixture.tensor("input.x").to_dtype(DType::F32).unwrap();
        let scores = net.forward(&x).unwrap();
        let what = format!("{}: imported checkpoint vs torchrec", fixture.name());
        assert_close(&what, &scores, fixture.tensor("output"), 1e-5);
    }
}

fn full_rank_state(n: usize, layers: usize) -> HashMap<String, Tensor> {
    (0..layers)
        .flat_map(|l| {
            [
                (format!("kernels.{l}"), Tensor::ones((n, n), DType::F32, &Device::Cpu).unwrap()),
                (format!("bias.{l}"), Tensor::zeros((n, 1), DType::F32, &Device::Cpu).unwrap()),
            ]
        })
        .collect()
}

#[test]
fn mismatched_state_dicts_are_reported_in_full_under_torchrec_names() {
    let mut state = full_rank_state(3, 2);
    state.remove("bias.1");
    state.insert("kernels.0".into(), Tensor::ones((3, 2), DType::F32, &Device::Cpu).unwrap());
    state.insert("kernels.5".into(), Tensor::ones((3, 3), DType::F32, &Device::Cpu).unwrap());
    let err = from_torchrec_state_dict(3, &CrossNetConfig::full_rank(2), state).unwrap_err().to_string();
    for needle in [
        "torchrec CrossNet state dict does not fit the config",
        "tensor `kernels.0` has shape [3, 2], the model expects [3, 3]",
        "missing tensor `bias.1`",
        "unexpected tensor `kernels.5`",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let mut state = full_rank_state(3, 1);
    state.insert("bias.0".into(), Tensor::new(&[[1f32], [f32::NAN], [0.0]], &Device::Cpu).unwrap());
    let err = from_torchrec_state_dict(3, &CrossNetConfig::full_rank(1), state).unwrap_err().to_string();
    assert!(err.contains("tensor `bias.0` holds non-finite values"), "{err}");
}

#[test]
fn configs_torchrec_cannot_express_are_refused() {
    let per_layer_gates = CrossNetConfig::mixture(1, 2, 3);
    let err = from_torchrec_state_dict(4, &per_layer_gates, HashMap::new()).unwrap_err().to_string();
    assert!(err.contains("`layer.shared_gates`") && err.contains("set it to true"), "{err}");
    let diag = CrossNetConfig { diag_scale: 0.5, ..CrossNetConfig::full_rank(1) };
    let err = from_torchrec_state_dict(4, &diag, full_rank_state(4, 1)).unwrap_err().to_string();
    assert!(err.contains("`diag_scale`"), "{err}");
}
