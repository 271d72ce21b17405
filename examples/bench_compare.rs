//! The rankstack side of `cargo xtask bench-compare` (see `docs/performance.md`): the
//! `homefeed-bench` model, timed the same way as `reference/rankstack_ref/bench_compare.py` times
//! PyTorch. Run through the xtask, which builds it in release mode and alternates the two.
//!
//! ```text
//! bench_compare prepare DIR   writes DIR/checkpoint (config.json, model.safetensors), the inputs
//!                             DIR/inputs-B.safetensors for every batch size (PyTorch key layout)
//!                             and DIR/expected.safetensors (rankstack's probabilities)
//! bench_compare infer DIR     scoring: median ms per batch at each batch size → one JSON line
//!                             (the serving model with packed f32 weights)
//! bench_compare infer-bf16 DIR  the same with packed bf16 weights, plus the largest probability
//!                             difference from the f32 model (DIR/expected.safetensors)
//! bench_compare train DIR     one training step (forward, backward, AdamW) at batch 512 → JSON
//! bench_compare gemm          the f32 GEMM rate (2048³) on this machine → JSON
//! ```
//!
//! Each command reports the process's peak resident memory (`VmHWM`), so inference and training
//! run as separate processes. Threads: `RAYON_NUM_THREADS` (the xtask sets 2).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "support/timing.rs"]
mod timing;
use timing::Timing;

use candle_core::{DType, Device, Tensor};
use rankstack::nn::packed_matmul::WeightPrecision;
use rankstack::nn::SeededVarMap;
use rankstack::ranker_model::{
    checkpoint, presets, random_batch, random_labels, reference_inputs, Ranker, RankerBatch,
};
use rankstack::train::{AdamW, AdamWConfig};
use serde_json::json;

/// Scoring batch sizes of the comparison.
const INFER_BATCHES: [usize; 4] = [1, 64, 512, 2048];
/// Training batch size.
const TRAIN_BATCH: usize = 512;
/// Seed of the model's initialisation.
const MODEL_SEED: u64 = 2024;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() {
    // Ablation switches for docs/performance.md (each undoes one optimisation):
    // BENCH_MMAP=1 keeps glibc's default mmap behaviour; BENCH_TRAINABLE_LOAD=1 scores with the
    // trainable (variable) model instead of the serving one; BENCH_DENSE_EMBEDDINGS=1 trains with
    // dense embedding gradients; BENCH_UNPACKED=1 scores without packing the linear weights;
    // CANDLE_NUM_THREADS=2 gives candle's element-wise pool its second thread back.
    // BENCH_BATCHES=1,64 times scoring at those batch sizes only (for quick A/B runs).
    // BENCH_PIN_THREADS=1 pins each kernel worker to its own CPU, as `rankstack serve
    // --pin-threads` does; BENCH_IDLE_MS=N pauses N ms (untimed) before each timed call.
    if !flag("BENCH_MMAP") {
        rankstack::memory::retain_freed_memory();
    }
    if flag("BENCH_PIN_THREADS") {
        if let Err(e) = rankstack::cpu_threads::pin_kernel_workers() {
            eprintln!("bench_compare: {e}");
            std::process::exit(1);
        }
    }
    // As the `rankstack` binary does.
    rankstack::cpu_threads::single_threaded_elementwise_ops();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match (args.first().map(String::as_str), args.get(1)) {
        (Some("prepare"), Some(dir)) => prepare(Path::new(dir)),
        (Some("infer"), Some(dir)) => infer(Path::new(dir), WeightPrecision::F32),
        (Some("infer-bf16"), Some(dir)) => infer(Path::new(dir), WeightPrecision::Bf16),
        (Some("train"), Some(dir)) => train(Path::new(dir)),
        (Some("gemm"), _) => gemm(),
        _ => Err("usage: bench_compare <prepare DIR|infer DIR|infer-bf16 DIR|train DIR|gemm>".into()),
    };
    if let Err(e) = result {
        eprintln!("bench_compare: {e}");
        std::process::exit(1);
    }
}

fn flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn checkpoint_dir(dir: &Path) -> PathBuf {
    dir.join("checkpoint")
}

/// The inputs of batch size `b`: the same for every command (seeded by `b`).
fn inputs(ranker: &Ranker, b: usize) -> Result<RankerBatch> {
    Ok(random_batch(ranker.config(), b, b as u64)?)
}

fn prepare(dir: &Path) -> Result<()> {
    let config = presets::preset("homefeed-bench")?;
    let store = SeededVarMap::new(MODEL_SEED);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu))?;
    checkpoint::save(checkpoint_dir(dir), &ranker, &store)?;
    let mut expected = Vec::new();
    let mut batches = INFER_BATCHES.to_vec();
    if !batches.contains(&TRAIN_BATCH) {
        batches.push(TRAIN_BATCH);
    }
    for b in batches {
        let batch = inputs(&ranker, b)?;
        let mut tensors = reference_inputs(ranker.config(), &batch)?;
        if b == TRAIN_BATCH {
            tensors.push(("labels".into(), random_labels(ranker.config(), b, 1)?));
        }
        checkpoint::write_safetensors(&dir.join(format!("inputs-{b}.safetensors")), &tensors, None)?;
        if INFER_BATCHES.contains(&b) {
            expected.push((format!("probabilities.{b}"), ranker.predict(&batch)?));
        }
    }
    checkpoint::write_safetensors(&dir.join("expected.safetensors"), &expected, None)?;
    let cost = ranker.cost(1).total();
    println!(
        "{}",
        json!({"parameters": cost.params, "flops_per_candidate": cost.flops_per_candidate, "dir": dir.display().to_string()})
    );
    Ok(())
}

/// Median seconds of `f` after one warm-up call, over at least 3 calls and about `budget`.
fn median_seconds(budget: Duration, f: impl FnMut() -> Result<()>) -> Result<(f64, usize)> {
    // BENCH_IDLE_MS=N: an untimed N ms pause before each call (a server's first batch after a gap).
    let idle_ms = std::env::var("BENCH_IDLE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let idle_before_each = Duration::from_millis(idle_ms);
    timing::median_seconds(Timing { warmups: 1, min_runs: 3, max_runs: 200, budget, idle_before_each }, f)
}

/// Minor page faults of this process so far (Linux; 0 elsewhere).
fn minor_page_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; minflt is field 10 (index 7 after it).
    stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(7)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`; 0 where unavailable).
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// The scoring batch sizes: `BENCH_BATCHES` (comma-separated) or all of [`INFER_BATCHES`].
fn infer_batches() -> Result<Vec<usize>> {
    match std::env::var("BENCH_BATCHES") {
        Ok(list) => list
            .split(',')
            .map(|b| match b.trim().parse::<usize>() {
                Ok(b) if INFER_BATCHES.contains(&b) => Ok(b),
                _ => Err(format!("BENCH_BATCHES: `{b}` is not one of {INFER_BATCHES:?}").into()),
            })
            .collect(),
        Err(_) => Ok(INFER_BATCHES.to_vec()),
    }
}

fn infer(dir: &Path, precision: WeightPrecision) -> Result<()> {
    let ranker = if flag("BENCH_TRAINABLE_LOAD") {
        checkpoint::load(checkpoint_dir(dir), DType::F32, &Device::Cpu)?.0
    } else if flag("BENCH_UNPACKED") && precision == WeightPrecision::F32 {
        checkpoint::load_for_serving(checkpoint_dir(dir), DType::F32, &Device::Cpu)?
    } else {
        checkpoint::load_packed_for_serving(checkpoint_dir(dir), precision)?
    };
    let expected = rankstack::nn::checkpoint::read_safetensors(dir.join("expected.safetensors"))?.tensors;
    let mut rows = Vec::new();
    let mut max_diff = 0f32;
    for b in infer_batches()? {
        let batch = inputs(&ranker, b)?;
        let p = ranker.predict(&batch)?;
        if let Some(want) = expected.get(&format!("probabilities.{b}")) {
            max_diff = max_diff.max((p - want)?.abs()?.max_all()?.to_scalar::<f32>()?);
        }
        let (median, runs) = median_seconds(Duration::from_secs(5), || {
            ranker.predict(&batch)?;
            Ok(())
        })?;
        rows.push(json!({"batch": b, "median_ms": median * 1e3, "runs": runs}));
    }
    let dtype = match precision {
        WeightPrecision::F32 => "f32",
        WeightPrecision::Bf16 => "bf16",
    };
    println!(
        "{}",
        json!({"framework": "rankstack", "mode": "infer", "dtype": dtype, "threads": threads(), "rows": rows,
               "max_abs_probability_difference_from_f32": max_diff, "peak_rss_bytes": peak_rss_bytes()})
    );
    Ok(())
}

fn train(dir: &Path) -> Result<()> {
    let (ranker, store) = checkpoint::load(checkpoint_dir(dir), DType::F32, &Device::Cpu)?;
    // The trainer's default: row-sparse embedding updates (BENCH_DENSE_EMBEDDINGS=1: dense, as PyTorch).
    let row_sparse = !flag("BENCH_DENSE_EMBEDDINGS");
    ranker.set_row_sparse_gradients(row_sparse);
    let batch = inputs(&ranker, TRAIN_BATCH)?;
    let labels = random_labels(ranker.config(), TRAIN_BATCH, 1)?;
    let mut optimizer = AdamW::new(store.named_vars(), AdamWConfig { lr: 1e-4, ..AdamWConfig::default() })?;
    // BENCH_PHASES=1 prints each step's phases (forward, backward, update) to stderr.
    let phases = flag("BENCH_PHASES");
    let (median, runs) = median_seconds(Duration::from_secs(10), || {
        // On the kernels' worker pool, as the trainer runs its steps.
        rankstack::nn::on_worker_pool(|| train_step(&ranker, &batch, &labels, &mut optimizer, phases))
            .map_err(|e| e as Box<dyn std::error::Error>)
    })?;
    println!(
        "{}",
        json!({"framework": "rankstack", "mode": "train", "dtype": "f32", "threads": threads(), "row_sparse_embeddings": row_sparse,
               "rows": [{"batch": TRAIN_BATCH, "median_ms": median * 1e3, "runs": runs}], "peak_rss_bytes": peak_rss_bytes()})
    );
    Ok(())
}

type SendResult<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One training step (forward, loss, backward, AdamW); with `phases`, each phase's time to stderr.
fn train_step(
    ranker: &Ranker,
    batch: &RankerBatch,
    labels: &Tensor,
    optimizer: &mut AdamW,
    phases: bool,
) -> SendResult<()> {
    let faults0 = minor_page_faults();
    let t0 = Instant::now();
    let logits = ranker.forward_t(batch, true)?;
    let loss = ranker.loss(&logits, labels, None)?;
    let t1 = Instant::now();
    let grads = loss.backward()?;
    let t2 = Instant::now();
    let rows = ranker.take_row_gradients(&grads)?;
    optimizer.step(&grads, &rows, 1e-4)?;
    drop(grads);
    if phases {
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let t3 = Instant::now();
        // The encoder's share of the forward pass (features and sequence), timed apart.
        let encoded = ranker.encode(batch, true)?;
        let t4 = Instant::now();
        let encode_backward = encoded.sum_all()?.backward()?;
        let t5 = Instant::now();
        ranker.take_row_gradients(&encode_backward)?; // clears this extra pass's record
        eprintln!(
            "forward {:.0} ms (encoder {:.0}), backward {:.0} ms (encoder alone {:.0}), update {:.0} ms, \
             {} minor page faults",
            ms(t0, t1),
            ms(t3, t4),
            ms(t1, t2),
            ms(t4, t5),
            ms(t2, t3),
            minor_page_faults() - faults0
        );
    }
    Ok(())
}

fn gemm() -> Result<()> {
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let (median, runs) = median_seconds(Duration::from_secs(3), || {
        a.matmul(&b)?;
        Ok(())
    })?;
    let gflops = 2.0 * (n as f64).powi(3) / median / 1e9;
    println!(
        "{}",
        json!({"framework": "rankstack", "mode": "gemm", "n": n, "gflops": gflops, "runs": runs, "threads": threads()})
    );
    Ok(())
}
