//! A one-off check of the synthetic teacher (not a CI test): trains the `mlp` and
//! `pinterest-homefeed` presets briefly on the default synthetic data and prints test AUC per
//! task. `cargo test --release --test data_teacher_check -- --ignored --nocapture`.

use candle_core::{DType, Device};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use ranker_model::{multitask_loss, presets, Ranker};
use rankstack::data::synthetic::{self, SyntheticSpec};
use rankstack::data::{ParquetDataset, Shuffle};
use rankstack_nn::SeededVarMap;

fn auc(scores: &[f32], labels: &[f32]) -> f64 {
    let mut pairs: Vec<(f32, bool)> = scores.iter().zip(labels).map(|(&s, &y)| (s, y > 0.5)).collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut i) = (0.0, 0);
    while i < pairs.len() {
        let mut j = i;
        while j + 1 < pairs.len() && pairs[j + 1].0 == pairs[i].0 {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += pairs[i..=j].iter().filter(|p| p.1).count() as f64 * mid;
        i = j + 1;
    }
    let pos = pairs.iter().filter(|p| p.1).count() as f64;
    let neg = pairs.len() as f64 - pos;
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

#[test]
#[ignore]
fn presets_on_the_synthetic_teacher() {
    let dir = std::env::temp_dir().join(format!("rankstack-teacher-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (train_p, test_p) = (dir.join("train.parquet"), dir.join("test.parquet"));
    synthetic::generate(&SyntheticSpec::default(), &train_p).unwrap();
    let t = synthetic::generate(&SyntheticSpec { rows: 5000, stream: 1, ..SyntheticSpec::default() }, &test_p).unwrap();
    eprintln!("teacher AUC on test: {:?}", t.teacher_auc);
    let train = ParquetDataset::open(&train_p).unwrap();
    let test = ParquetDataset::open(&test_p).unwrap();
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|e| e.parse().ok()).unwrap_or(d);
    let (epochs, batch_size) = (env("EPOCHS", 3), env("BATCH", 256));
    for name in ["mlp", "pinterest-homefeed"] {
        let mut config = presets::preset(name).unwrap();
        train.schema().apply(&mut config).unwrap();
        let params = SeededVarMap::new(0);
        let ranker = Ranker::new(&config, params.var_builder(DType::F32, &Device::Cpu)).unwrap();
        let mut opt =
            AdamW::new(params.var_map().all_vars(), ParamsAdamW { lr: 1e-3, weight_decay: 0.0, ..Default::default() })
                .unwrap();
        let t0 = std::time::Instant::now();
        for epoch in 0..epochs {
            let mut losses = Vec::new();
            for batch in train.batches(batch_size, Some(Shuffle { seed: epoch as u64, buffer_rows: 20_000 })).unwrap() {
                let batch = batch.unwrap();
                let logits = ranker.forward_t(&batch.batch, true).unwrap();
                let loss = multitask_loss(&logits, &batch.labels, &[1.0; 4], None).unwrap();
                opt.backward_step(&loss).unwrap();
                losses.push(loss.to_scalar::<f32>().unwrap());
            }
            let (mut scores, mut labels) = (vec![Vec::new(); 4], vec![Vec::new(); 4]);
            for batch in test.batches(1024, None).unwrap() {
                let batch = batch.unwrap();
                let logits = ranker.forward(&batch.batch).unwrap().to_vec2::<f32>().unwrap();
                let y = batch.labels.to_vec2::<f32>().unwrap();
                for (l, yy) in logits.iter().zip(&y) {
                    for t in 0..4 {
                        scores[t].push(l[t]);
                        labels[t].push(yy[t]);
                    }
                }
            }
            let aucs: Vec<String> = (0..4).map(|t| format!("{:.4}", auc(&scores[t], &labels[t]))).collect();
            eprintln!(
                "{name} epoch {epoch}: train loss {:.4}, test AUC save/click/closeup/hide {aucs:?} ({:.1?})",
                losses.iter().sum::<f32>() / losses.len() as f32,
                t0.elapsed()
            );
        }
    }
}
