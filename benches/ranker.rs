//! Criterion benchmarks of the whole `pinterest-homefeed` preset: scoring (eval-mode forward) at
//! batch 1, 64, 512 and 2048, and one AdamW training step (forward, backward, update) at batch 512.
//! `cargo bench --bench ranker`.

use std::time::Duration;

use candle_core::{DType, Device};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rankstack::nn::SeededVarMap;
use rankstack::ranker_model::{presets, random_batch, random_labels, Ranker};

fn bench_ranker(c: &mut Criterion) {
    let config = presets::preset("pinterest-homefeed").expect("preset");
    let store = SeededVarMap::new(0);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).expect("build");

    let mut scoring = c.benchmark_group("pinterest_homefeed_scoring");
    scoring.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    for batch in [1usize, 64, 512, 2048] {
        let inputs = random_batch(&config, batch, batch as u64).expect("batch");
        scoring.throughput(Throughput::Elements(batch as u64));
        scoring.bench_with_input(BenchmarkId::from_parameter(batch), &inputs, |b, inputs| {
            b.iter(|| ranker.predict(inputs).expect("predict"))
        });
    }
    scoring.finish();

    let mut training = c.benchmark_group("pinterest_homefeed_training_step");
    training.sample_size(10).measurement_time(Duration::from_secs(10)).warm_up_time(Duration::from_secs(1));
    let batch = 512;
    let inputs = random_batch(&config, batch, 7).expect("batch");
    let labels = random_labels(&config, batch, 8).expect("labels");
    let vars = store.named_vars().into_iter().map(|(_, v)| v).collect();
    let mut optimizer = AdamW::new(vars, ParamsAdamW { lr: 1e-4, ..ParamsAdamW::default() }).expect("optimizer");
    training.throughput(Throughput::Elements(batch as u64));
    training.bench_function(BenchmarkId::from_parameter(batch), |b| {
        b.iter(|| {
            let logits = ranker.forward_t(&inputs, true).expect("forward");
            let loss = ranker.loss(&logits, &labels, None).expect("loss");
            optimizer.backward_step(&loss).expect("step");
        })
    });
    training.finish();
}

criterion_group!(benches, bench_ranker);
criterion_main!(benches);
