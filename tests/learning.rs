//! Learning on the synthetic data: the interaction layers must matter. On the interaction-driven
//! `save` task (2nd- and 3rd-order planted interactions), `pinterest-homefeed` must beat `mlp`'s test
//! AUC by a clear margin, and the training loss must fall epoch after epoch.

mod support;

use rankstack::ranker_model::presets;
use rankstack::train::{AdamWConfig, TrainOptions, Trainer};
use support::{tmpdir, write_data};

/// Mean training loss of each epoch, from `metrics.jsonl` (the smoothed curve).
fn epoch_losses(run: &std::path::Path) -> Vec<f64> {
    let mut sums: Vec<(f64, f64)> = Vec::new();
    for line in std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] == "train" {
            let e = v["epoch"].as_u64().unwrap() as usize;
            if sums.len() < e {
                sums.resize(e, (0.0, 0.0));
            }
            sums[e - 1].0 += v["loss"].as_f64().unwrap();
            sums[e - 1].1 += 1.0;
        }
    }
    sums.iter().map(|(s, n)| s / n).collect()
}

#[test]
fn pinterest_homefeed_beats_mlp_on_the_interaction_task() {
    let dir = tmpdir("learning");
    let (train, eval) = write_data(&dir, 16_000, 4_000);
    // Settings chosen for a wide, seed-independent margin. With 4 epochs at lr 3e-3 (this test's
    // earlier settings) both models were still far from converged and `pinterest-homefeed` diverged
    // in some runs (loss 2.7 → 22 right after warm-up, save AUC 0.54), so the margin depended on
    // the seed and even on which elements dropout hit. Here `mlp` peaks and starts to overfit,
    // and `pinterest-homefeed` converged in every run of a sweep over seeds (see the assertion).
    let options = TrainOptions {
        epochs: 8,
        batch_size: 256,
        optimizer: AdamWConfig { lr: 2e-3, ..AdamWConfig::default() },
        warmup_steps: 30,
        quiet: true,
        seed: 1,
        ..TrainOptions::default()
    };
    let mut save_auc = Vec::new();
    for preset in ["mlp", "pinterest-homefeed"] {
        let mut config = presets::preset(preset).unwrap();
        train.schema().apply(&mut config).unwrap();
        let run = dir.join(preset);
        let report = Trainer::new(&config, options.clone(), &run).unwrap().fit(&train, Some(&eval)).unwrap();
        let last = report.evaluations.last().unwrap();
        let auc = last.tasks.iter().find(|(n, _)| n == "save").unwrap().1.auc;
        let losses = epoch_losses(&run);
        println!("{preset}: save AUC {auc:.4}; epoch training losses {losses:?}");
        assert!(losses.windows(2).all(|w| w[1] < w[0]), "{preset}: training loss must fall every epoch: {losses:?}");
        save_auc.push(auc);
    }
    let (mlp, homefeed) = (save_auc[0], save_auc[1]);
    // Measured at these settings over training seeds 1–4 (save AUC, mlp / pinterest-homefeed):
    // 0.626 / 0.735, 0.632 / 0.767, 0.625 / 0.772, 0.632 / 0.719 — margins 0.09–0.15 (teacher
    // ceiling ≈ 0.91).
    assert!(homefeed > mlp + 0.05, "pinterest-homefeed save AUC {homefeed:.4} vs mlp {mlp:.4}");
}
