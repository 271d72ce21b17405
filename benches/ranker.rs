//! Criterion benchmarks of the whole `homefeed-bench` model: scoring (a serving model: plain
//! tensors, no backward graph; linear weights unpacked, packed f32 and packed bf16) at batch 1,
//! 64, 512 and 2048, and one training step (forward,
//! backward, the trainer's AdamW with row-sparse embedding updates) at batch 512.
//! `cargo bench --bench ranker`. For the side-by-side comparison with PyTorch, see
//! `cargo xtask bench-compare` and `docs/performance.md`.

#![forbid(unsafe_code)]

use std::time::Duration;

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rankstack::nn::checkpoint::FrozenTensors;
use rankstack::nn::packed_matmul::WeightPrecision;
use rankstack::nn::{pack_linear_layers, SeededVarMap};
use rankstack::ranker_model::{presets, random_batch, random_labels, Ranker};
use rankstack::train::{AdamW, AdamWConfig};

fn bench_ranker(c: &mut Criterion) {
    rankstack::memory::retain_freed_memory();
    let config = presets::preset("homefeed-bench").expect("preset");
    let store = SeededVarMap::new(0);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).expect("build");

    // The serving model: the same weights as plain tensors (what checkpoint::load_for_serving builds).
    let weights = store.named_vars().into_iter().map(|(n, v)| (n, v.as_tensor().detach())).collect();
    let frozen = FrozenTensors::new(weights);
    let unpacked = Ranker::new(&config, frozen.var_builder(DType::F32, &Device::Cpu)).expect("serving model");
    // What checkpoint::load_packed_for_serving builds: linear weights packed in f32 or bf16.
    let mut packed = Vec::new();
    for precision in [WeightPrecision::F32, WeightPrecision::Bf16] {
        let mut model = Ranker::new(&config, frozen.var_builder(DType::F32, &Device::Cpu)).expect("serving model");
        pack_linear_layers(&mut model, precision).expect("pack");
        packed.push((format!("packed_{precision:?}").to_lowercase(), model));
    }
    let mut scoring = c.benchmark_group("homefeed_bench_scoring");
    scoring.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    for batch in [1usize, 64, 512, 2048] {
        let inputs = random_batch(&config, batch, batch as u64).expect("batch");
        scoring.throughput(Throughput::Elements(batch as u64));
        scoring.bench_with_input(BenchmarkId::new("unpacked", batch), &inputs, |b, inputs| {
            b.iter(|| unpacked.predict(inputs).expect("predict"))
        });
        for (name, model) in &packed {
            scoring.bench_with_input(BenchmarkId::new(name.as_str(), batch), &inputs, |b, inputs| {
                b.iter(|| model.predict(inputs).expect("predict"))
            });
        }
    }
    scoring.finish();

    let mut training = c.benchmark_group("homefeed_bench_training_step");
    training.sample_size(10).measurement_time(Duration::from_secs(10)).warm_up_time(Duration::from_secs(1));
    let batch = 512;
    let inputs = random_batch(&config, batch, 7).expect("batch");
    let labels = random_labels(&config, batch, 8).expect("labels");
    ranker.set_row_sparse_gradients(true);
    let mut optimizer =
        AdamW::new(store.named_vars(), AdamWConfig { lr: 1e-4, ..AdamWConfig::default() }).expect("optimizer");
    training.throughput(Throughput::Elements(batch as u64));
    training.bench_function(BenchmarkId::from_parameter(batch), |b| {
        b.iter(|| {
            let logits = ranker.forward_t(&inputs, true).expect("forward");
            let loss = ranker.loss(&logits, &labels, None).expect("loss");
            let grads = loss.backward().expect("backward");
            let rows = ranker.take_row_gradients(&grads).expect("row gradients");
            optimizer.step(&grads, &rows, 1e-4).expect("step");
        })
    });
    training.finish();
}

criterion_group!(benches, bench_ranker);
criterion_main!(benches);
