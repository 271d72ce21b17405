//! `rankstack import` end to end: each peer state dict committed under `fixtures/` (torchrec's own
//! modules; TransAct, Twitter MaskNet and `nn.TransformerEncoder` from the reference written from
//! their code) imports with one command, and the checkpoint it writes scores the fixture's inputs
//! as the peer module did (f32 round-off). Bad input gets one line.

mod support;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use rankstack::nn::testing::{assert_close, fixture_paths, fixtures_root, Fixture};
use rankstack::sequence_transformer::SequenceBatch;
use support::cli::{fails, ok};

/// The fixture's rankstack config as a JSON file in `dir`.
fn config_file(dir: &Path, fixture: &Fixture) -> PathBuf {
    let mut config: serde_json::Value = fixture.config();
    if fixture.meta("peer").as_deref() == Some("twitter-masknet") {
        // {"parallel": {…}} or {"serial": {…}}: per-block parallel and serial configs both have `blocks`.
        let kind = if fixture.meta("layer").as_deref() == Some("SerialMaskNet") { "serial" } else { "parallel" };
        config = serde_json::json!({ kind: config });
    }
    let path = dir.join(format!("{}.json", fixture.name()));
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path
}

/// Runs `rankstack import` on the fixture's saved state dict; returns the checkpoint directory.
fn import(dir: &Path, group: &str, fixture: &Fixture) -> PathBuf {
    let state_dict = fixtures_root().join(group).join("state_dicts").join(format!("{}.safetensors", fixture.name()));
    let config = config_file(dir, fixture);
    let out = dir.join(fixture.name());
    let peer = fixture.meta("peer").expect("peer");
    let (state_dict, config, out_s) =
        (state_dict.display().to_string(), config.display().to_string(), out.display().to_string());
    let mut args = vec!["import", "--from", &peer, &state_dict, "--config", &config, "--out", &out_s];
    let input_dim = fixture.meta("input_dim");
    if let Some(d) = &input_dim {
        args.extend(["--input-dim", d]);
    }
    let summary = ok(&args);
    assert!(summary.contains("imported") && summary.contains(&out_s), "{summary}");
    out
}

#[test]
fn torchrec_state_dicts_import_with_one_command_and_score_like_torchrec() {
    let dir = support::tmpdir("import-torchrec");
    for path in fixture_paths("torchrec") {
        let fixture = Fixture::load(&path).unwrap();
        let checkpoint = import(&dir, "torchrec", &fixture);
        let (net, _) = rankstack::dcnv2::load_cross_net(&checkpoint, DType::F32, &Device::Cpu).unwrap();
        let scores = net.forward(&fixture.tensor("input.x").to_dtype(DType::F32).unwrap()).unwrap();
        // torchrec's own float32 run, and the float64 truth.
        assert_close(&format!("{}: vs torchrec f32", fixture.name()), &scores, fixture.tensor("f32.output"), 1e-5);
        assert_close(&format!("{}: vs float64", fixture.name()), &scores, fixture.tensor("output"), 1e-5);
    }
}

/// The imported checkpoint's output on the fixture's inputs, in f32.
fn score_peer(checkpoint: &Path, fixture: &Fixture) -> Tensor {
    let f32_input = |name: &str| {
        let t = fixture.tensor(&format!("input.{name}"));
        if t.dtype().is_float() {
            t.to_dtype(DType::F32).unwrap()
        } else {
            t.clone()
        }
    };
    let (dtype, cpu) = (DType::F32, &Device::Cpu);
    match fixture.meta("layer").as_deref() {
        Some("SequenceTransformer") => {
            let (model, _) =
                rankstack::sequence_transformer::load_sequence_transformer(checkpoint, dtype, cpu).unwrap();
            model
                .forward(&SequenceBatch {
                    action_types: f32_input("action_types"),
                    item_embeddings: f32_input("item_embeddings"),
                    timestamps: f32_input("timestamps"),
                    request_time: f32_input("request_time"),
                    candidate: f32_input("candidate"),
                })
                .unwrap()
        }
        Some("ParallelMaskNet") => {
            let (net, _) = rankstack::masknet::load_parallel_masknet(checkpoint, dtype, cpu).unwrap();
            net.forward(&f32_input("x")).unwrap()
        }
        Some("SerialMaskNet") => {
            let (net, _) = rankstack::masknet::load_serial_masknet(checkpoint, dtype, cpu).unwrap();
            net.forward(&f32_input("x")).unwrap()
        }
        Some("TransformerEncoder") => {
            let (encoder, _) =
                rankstack::sequence_transformer::load_transformer_encoder(checkpoint, dtype, cpu).unwrap();
            let padded = f32_input("mask").to_dtype(dtype).unwrap();
            let key_mask = (padded * f64::from(f32::MIN)).unwrap(); // 1 → hidden (softmax weight 0)
            encoder.forward_t(&f32_input("x"), Some(&key_mask), false).unwrap()
        }
        other => panic!("{}: unexpected layer {other:?}", fixture.name()),
    }
}

#[test]
fn transact_twitter_and_torch_transformer_state_dicts_import_with_one_command() {
    let dir = support::tmpdir("import-peers");
    let paths = fixture_paths("peers");
    assert_eq!(paths.len(), 11, "4 TransAct, 4 Twitter MaskNet, 3 nn.TransformerEncoder");
    for path in paths {
        let fixture = Fixture::load(&path).unwrap();
        let checkpoint = import(&dir, "peers", &fixture);
        let scores = score_peer(&checkpoint, &fixture);
        assert_close(&format!("{}: vs the peer in f32", fixture.name()), &scores, fixture.tensor("f32.output"), 1e-5);
        assert_close(&format!("{}: vs float64", fixture.name()), &scores, fixture.tensor("output"), 1e-5);
    }
}

#[test]
fn import_errors_are_one_line_and_never_overwrite() {
    let dir = support::tmpdir("import-errors");
    let fixture = Fixture::load(fixtures_root().join("torchrec/lowrank_r2_b4_d8_l2.safetensors")).unwrap();
    let out = import(&dir, "torchrec", &fixture);
    let state_dict = fixtures_root().join("torchrec/state_dicts/lowrank_r2_b4_d8_l2.safetensors");
    let config = config_file(&dir, &fixture);
    let (sd, cfg, out_s) = (state_dict.display().to_string(), config.display().to_string(), out.display().to_string());
    let base = ["import", "--from", "torchrec-lowrank", &sd, "--config", &cfg, "--out", &out_s];
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let err = fails(&[&base[..], &["--input-dim", "8"]].concat());
    assert!(err.contains("already exists; pass --force"), "{err}");
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), before);
    ok(&[&base[..], &["--input-dim", "8", "--force"]].concat());
    // Wrong width: every tensor named with torchrec's name and both shapes.
    let other = dir.join("other").display().to_string();
    let base = ["import", "--from", "torchrec-lowrank", &sd, "--config", &cfg, "--out", &other];
    let err = fails(&[&base[..], &["--input-dim", "9"]].concat());
    assert!(err.contains("torchrec LowRankCrossNet state dict does not fit the config"), "{err}");
    assert!(err.contains("tensor `W_kernels.0` has shape [8, 2], the model expects [9, 2]"), "{err}");
    let err =
        fails(&["import", "--from", "torchrec-mixture", &sd, "--config", &cfg, "--out", &other, "--input-dim", "8"]);
    assert!(err.contains("needs a layer of type `mixture`"), "{err}");
    // A pickle is refused with the way to convert it; --input-dim where the config has the width too.
    let pickle = dir.join("model.pt");
    std::fs::write(&pickle, b"not read").unwrap();
    let pickle = pickle.display().to_string();
    let err = fails(&["import", "--from", "torchrec-lowrank", &pickle, "--config", &cfg, "--out", &other]);
    assert!(err.contains("PyTorch pickle") && err.contains("save_file"), "{err}");
    let err = fails(&["import", "--from", "transact", &sd, "--config", &cfg, "--out", &other, "--input-dim", "8"]);
    assert!(err.contains("--input-dim") && err.contains("not used by --from transact"), "{err}");
    assert!(!Path::new(&other).exists());
    // Without --input-dim the width is read off the state dict (torchrec's `bias.0`).
    let summary = ok(&base);
    assert!(summary.contains("imported torchrec LowRankCrossNet"), "{summary}");
    let (net, _) = rankstack::dcnv2::load_cross_net(Path::new(&other), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(net.input_dim(), 8);
}

/// Damaged state dicts (peer files carry no checksum): 8 truncations and 60 single-bit flips of a
/// torchrec state dict, imported through the library call. Each is refused with an error or, where
/// the flip only changed a weight to another finite value, imported as those weights; none panics,
/// and every checkpoint written loads (finite, checksummed).
#[test]
fn damaged_state_dicts_are_refused_or_imported_as_what_they_hold() {
    use rankstack::commands::{import, ImportArgs, ImportSource};
    let dir = support::tmpdir("import-damaged");
    let fixture = Fixture::load(fixtures_root().join("torchrec/lowrank_r2_b4_d8_l2.safetensors")).unwrap();
    let config = config_file(&dir, &fixture);
    let bytes = std::fs::read(fixtures_root().join("torchrec/state_dicts/lowrank_r2_b4_d8_l2.safetensors")).unwrap();
    let mut damaged: Vec<Vec<u8>> = (1..=8).map(|k| bytes[..bytes.len() * k / 9].to_vec()).collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..60 {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let bit = (state >> 33) as usize % (bytes.len() * 8);
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        damaged.push(flipped);
    }
    let (mut refused, mut imported) = (0, 0);
    for (i, file) in damaged.iter().enumerate() {
        let path = dir.join(format!("damaged-{i}.safetensors"));
        std::fs::write(&path, file).unwrap();
        let out = dir.join(format!("out-{i}"));
        let args = ImportArgs { state_dict: &path, config: &config, input_dim: Some(8), out: &out, force: false };
        match import(ImportSource::TorchrecLowRank, &args) {
            Ok(_) => {
                imported += 1;
                // What was written loads: finite (the loader refuses anything else) and checksummed.
                // (A flipped exponent bit can make a weight huge but finite: imported as it is.)
                rankstack::dcnv2::load_cross_net(&out, DType::F32, &Device::Cpu).unwrap();
            }
            Err(e) => {
                refused += 1;
                assert!(!out.exists(), "damaged-{i}: refused ({e}) but wrote {}", out.display());
            }
        }
    }
    eprintln!("damaged state dicts: {refused} refused, {imported} imported as the weights they hold");
    assert_eq!(refused + imported, 68);
    assert!(refused >= 8, "every truncation is refused: {refused} refused");
}
