//! The rankstack side of `cargo xtask gpu-bench` (see `docs/performance.md`): the
//! `homefeed-bench` model on a CUDA GPU, timed the same way as
//! `reference/rankstack_ref/gpu_bench.py` times PyTorch on the same GPU. Built with
//! `--features cuda` by the xtask; run on the GPU machine by the bundle's `bench.sh`.
//!
//! ```text
//! gpu_bench prepare DIR        writes DIR/checkpoint, the inputs DIR/inputs-B.safetensors of every
//!                              batch size (PyTorch key layout, labels included) and
//!                              DIR/expected.safetensors (rankstack's f32 probabilities at batch 512,
//!                              computed on the GPU)
//! gpu_bench infer DIR f32|tf32|bf16   scoring: median ms per batch at each batch size, peak tensor
//!                              memory, the largest probability difference from f32, and what
//!                              the model's code copied between host and device in one call → JSON
//! gpu_bench train DIR f32|bf16 one training step (forward, backward, row-sparse AdamW) at each
//!                              training batch size, planned and measured peak memory, and what
//!                              the model's code copied between host and device in one step → JSON
//! gpu_bench parts DIR f32|tf32 [infer|train]
//!                              where the time goes: scoring at each batch size and the f32
//!                              training step (or only one of them), part by part
//!                              (rankstack_nn::probe): each part's median ms and the tensor memory
//!                              it left allocated, beside the median of unrecorded calls; on the
//!                              CPU also the tensors each part wrote and their bytes → JSON
//! ```
//!
//! `GPU_BENCH_DEVICE=cpu` runs any of them on the CPU instead (to try the bundle's commands on a
//! machine without a GPU; the times are then the CPU's); `GPU_BENCH_BATCHES=64,256` replaces the
//! batch sizes of `infer`, `train` and `parts`. The program counts its heap
//! ([`CountingAllocator`]), so on the CPU the peak memory is the tensors' heap peak; with
//! `RANKSTACK_CPU=candle` as well (the CPU kernels off) it is the peak of the very graph a GPU
//! runs: the GPU's tensor memory, measured without a GPU.
//!
//! Times are medians of at least 5 calls after 2 warm-up calls, each call ending with the result
//! read back to the host (which waits for the GPU); the inputs are on the GPU before timing starts.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

#[path = "support/timing.rs"]
mod timing;
use timing::Timing;

use candle_core::{DType, Device, Tensor};
use rankstack::data::inputs_to_device;
use rankstack::kernels::cpu::heap_count::CountingAllocator;
use rankstack::nn::device_memory::{peak_tensor_bytes, reset_peak};
use rankstack::nn::host_transfer::{record_transfers, Direction, Transfer};
use rankstack::nn::packed_matmul::WeightPrecision;
use rankstack::nn::probe::{mark, record_parts, PartTime};
use rankstack::nn::SeededVarMap;
use rankstack::ranker_model::{
    checkpoint, presets, random_batch, random_labels, reference_inputs, Ranker, RankerBatch,
};
use rankstack::train::{AdamW, AdamWConfig};
use serde_json::json;

/// Scoring batch sizes.
const INFER_BATCHES: [usize; 4] = [512, 2048, 8192, 32768];
/// Training batch sizes.
const TRAIN_BATCHES: [usize; 2] = [2048, 8192];
/// Seed of the model's initialisation (the same as `bench_compare`'s).
const MODEL_SEED: u64 = 2024;

/// Counts heap bytes: on the CPU the peak memory figures are then the tensors' (see the module
/// documentation).
#[global_allocator]
static HEAP: CountingAllocator = CountingAllocator;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let result = match (arg(0), arg(1), arg(2)) {
        (Some("prepare"), Some(dir), _) => prepare(Path::new(dir)),
        (Some("infer"), Some(dir), Some(dtype)) => infer(Path::new(dir), dtype),
        (Some("train"), Some(dir), Some(dtype)) => train(Path::new(dir), dtype),
        (Some("parts"), Some(dir), Some(dtype)) => parts(Path::new(dir), dtype, arg(3)),
        _ => {
            Err("usage: gpu_bench <prepare DIR | infer DIR f32|tf32|bf16 | train DIR f32|bf16 | parts DIR f32|tf32 [infer|train]>"
                .into())
        }
    };
    if let Err(e) = result {
        eprintln!("gpu_bench: {e}");
        std::process::exit(1);
    }
}

/// The first GPU, or the CPU with `GPU_BENCH_DEVICE=cpu`.
fn gpu() -> Result<Device> {
    match std::env::var("GPU_BENCH_DEVICE").as_deref() {
        Ok("cpu") => Ok(Device::Cpu),
        Ok(other) if other != "cuda" => Err(format!("GPU_BENCH_DEVICE={other}: expected cpu or cuda").into()),
        _ => Ok(rankstack::device::DeviceSpec::Cuda(0).open()?),
    }
}

fn checkpoint_dir(dir: &Path) -> PathBuf {
    dir.join("checkpoint")
}

fn inputs_file(dir: &Path, b: usize) -> PathBuf {
    dir.join(format!("inputs-{b}.safetensors"))
}

fn prepare(dir: &Path) -> Result<()> {
    let config = presets::preset("homefeed-bench")?;
    let store = SeededVarMap::new(MODEL_SEED);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu))?;
    checkpoint::save(checkpoint_dir(dir), &ranker, &store)?;
    let mut batches: Vec<usize> = INFER_BATCHES.iter().chain(&TRAIN_BATCHES).copied().collect();
    batches.sort_unstable();
    batches.dedup();
    for b in batches {
        let batch = random_batch(ranker.config(), b, b as u64)?;
        let mut tensors = reference_inputs(ranker.config(), &batch)?;
        tensors.push(("labels".into(), random_labels(ranker.config(), b, 1)?));
        checkpoint::write_safetensors(&inputs_file(dir, b), &tensors, None)?;
    }
    // Expected probabilities from the GPU model itself (the PyTorch side checks against them).
    let device = gpu()?;
    let serving = checkpoint::load_for_serving(checkpoint_dir(dir), DType::F32, &device)?;
    let b = INFER_BATCHES[0];
    let batch = inputs_to_device(random_batch(serving.config(), b, b as u64)?, &device)?;
    let p = serving.predict(&batch)?.to_device(&Device::Cpu)?;
    checkpoint::write_safetensors(&dir.join("expected.safetensors"), &[(format!("probabilities.{b}"), p)], None)?;
    let cost = ranker.cost(1).total();
    println!("{}", json!({"parameters": cost.params, "flops_per_candidate": cost.flops_per_candidate}));
    Ok(())
}

/// Median seconds of `f` after two warm-up calls, over at least 5 calls and about `budget`.
fn median_seconds(budget: Duration, f: impl FnMut() -> Result<()>) -> Result<(f64, usize)> {
    timing::median_seconds(
        Timing { warmups: 2, min_runs: 5, max_runs: 100, budget, idle_before_each: Duration::ZERO },
        f,
    )
}

fn set_tf32(on: bool) {
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

fn infer(dir: &Path, dtype: &str) -> Result<()> {
    let device = gpu()?;
    let mut ranker = checkpoint::load_for_serving(checkpoint_dir(dir), DType::F32, &device)?;
    set_tf32(dtype == "tf32");
    match dtype {
        "f32" | "tf32" => {}
        "bf16" => {
            rankstack::nn::pack_linear_layers(&mut ranker, WeightPrecision::Bf16)?;
        }
        other => return Err(format!("unknown dtype {other}").into()),
    }
    let expected = rankstack::nn::checkpoint::read_safetensors(dir.join("expected.safetensors"))?.tensors;
    let mut rows = Vec::new();
    let mut max_diff = 0f32;
    for b in batch_sizes(&INFER_BATCHES)? {
        let batch = inputs_to_device(random_batch(ranker.config(), b, b as u64)?, &device)?;
        if let Some(want) = expected.get(&format!("probabilities.{b}")) {
            let p = ranker.predict(&batch)?.to_device(&Device::Cpu)?;
            max_diff = max_diff.max((p - want)?.abs()?.max_all()?.to_scalar::<f32>()?);
        }
        reset_peak(&device)?;
        let outcome = median_seconds(Duration::from_secs(2), || {
            // Reading the probabilities back waits for the GPU.
            ranker.predict(&batch)?.to_device(&Device::Cpu)?;
            Ok(())
        });
        let (_, transfers) = record_transfers(|| ranker.predict(&batch));
        match outcome {
            Ok((median, runs)) => rows.push(json!({"batch": b, "median_ms": median * 1e3, "runs": runs,
                "candidates_per_second": b as f64 / median, "peak_tensor_bytes": peak_tensor_bytes(&device)?,
                "model_transfers": transfer_summary(&transfers)})),
            Err(e) => rows.push(json!({"batch": b, "error": e.to_string()})),
        }
    }
    // Which attention scored (`RANKSTACK_DEVICE_ATTENTION`, off the CPU kernels): the
    // forward-only kernel, or the composed candle operations.
    let attention = std::env::var(rankstack::kernels::device_packed_attention::DEVICE_ATTENTION_ENV)
        .unwrap_or_else(|_| "fused".into());
    println!(
        "{}",
        json!({"framework": "rankstack", "mode": "infer", "dtype": dtype, "attention": attention, "rows": rows,
               "max_abs_probability_difference_from_f32": max_diff})
    );
    Ok(())
}

fn train(dir: &Path, dtype: &str) -> Result<()> {
    let device = gpu()?;
    let mut rows = Vec::new();
    for b in batch_sizes(&TRAIN_BATCHES)? {
        let mut step = TrainingStep::load(dir, &device, b)?;
        rankstack::nn::autocast_linear_layers(&mut step.ranker, (dtype == "bf16").then_some(DType::BF16));
        reset_peak(&device)?;
        let mut last_loss = f64::NAN;
        let outcome = median_seconds(Duration::from_secs(5), || {
            last_loss = step.run()?;
            Ok(())
        });
        let planned = step.ranker.cost(b).training_bytes();
        let peak = peak_tensor_bytes(&device)?;
        let (_, transfers) = record_transfers(|| step.run());
        match outcome {
            Ok((median, runs)) => rows.push(json!({"batch": b, "median_ms": median * 1e3, "runs": runs,
                "examples_per_second": b as f64 / median, "loss": last_loss,
                "peak_tensor_bytes": peak, "planned_bytes": planned,
                "model_transfers": transfer_summary(&transfers)})),
            Err(e) => rows.push(json!({"batch": b, "error": e.to_string(), "planned_bytes": planned})),
        }
    }
    // Which AdamW update ran (`RANKSTACK_ADAMW`): the fused kernels, or the tensor version.
    let adamw = std::env::var(rankstack::train::ADAMW_ENV).unwrap_or_else(|_| "fused".into());
    println!("{}", json!({"framework": "rankstack", "mode": "train", "dtype": dtype, "adamw": adamw, "rows": rows}));
    Ok(())
}

/// The host↔device copies of one call ([`rankstack::nn::host_transfer`]: every transfer of the
/// model's, the loss's and the optimizer's code; the benchmark's own read of the result is outside
/// it): the reads from the device (count, bytes, names; on a GPU there should be none when scoring
/// and one per training step; on the CPU none by definition) and the writes to the device, by name
/// (count, bytes, origin). Writes are listed on the CPU too, where nothing is copied
/// (`"copied": 0`): they are what a GPU would copy.
fn transfer_summary(transfers: &[Transfer]) -> serde_json::Value {
    let bytes = |t: &Transfer| (t.elements * t.dtype.size_in_bytes()) as u64;
    let reads: Vec<&Transfer> = transfers.iter().filter(|t| t.crosses && t.direction == Direction::ToHost).collect();
    let writes: Vec<&Transfer> = transfers.iter().filter(|t| t.direction == Direction::ToDevice).collect();
    let mut by_what = serde_json::Map::new();
    for t in &writes {
        let entry = by_what
            .entry(t.what)
            .or_insert_with(|| json!({"count": 0, "bytes": 0, "origin": format!("{:?}", t.origin)}));
        entry["count"] = json!(entry["count"].as_u64().unwrap_or(0) + 1);
        entry["bytes"] = json!(entry["bytes"].as_u64().unwrap_or(0) + bytes(t));
    }
    json!({
        "reads_from_device": {"count": reads.len(), "bytes": reads.iter().map(|t| bytes(t)).sum::<u64>(),
                              "what": reads.iter().map(|t| t.what).collect::<Vec<_>>()},
        "writes_to_device": {"count": writes.len(), "bytes": writes.iter().map(|t| bytes(t)).sum::<u64>(),
                             "copied": writes.iter().filter(|t| t.crosses).count(), "by_what": by_what},
        "recorded": transfers.len(),
    })
}

/// One training step of the checkpoint's model on a seeded batch: row-sparse AdamW (lr 1e-4).
struct TrainingStep {
    ranker: Ranker,
    batch: RankerBatch,
    labels: Tensor,
    optimizer: AdamW,
}

impl TrainingStep {
    /// The checkpoint in `dir` on `device`, with batch `b`'s inputs and labels there.
    fn load(dir: &Path, device: &Device, b: usize) -> Result<Self> {
        let (ranker, store) = checkpoint::load(checkpoint_dir(dir), DType::F32, device)?;
        ranker.set_row_sparse_gradients(true);
        let batch = inputs_to_device(random_batch(ranker.config(), b, b as u64)?, device)?;
        let labels = random_labels(ranker.config(), b, 1)?.to_device(device)?;
        let optimizer = AdamW::new(store.named_vars(), AdamWConfig { lr: 1e-4, ..AdamWConfig::default() })?;
        Ok(Self { ranker, batch, labels, optimizer })
    }

    /// Forward, loss, backward, AdamW; the loss read back at the end, as the trainer does every
    /// step (which waits for the GPU). Its marks name the probe's `loss`, `backward` and
    /// `optimizer` parts (nothing outside a recording).
    fn run(&mut self) -> candle_core::Result<f64> {
        let logits = self.ranker.forward_t(&self.batch, true)?;
        let loss = self.ranker.loss(&logits, &self.labels, None)?;
        mark("loss", &loss)?;
        let grads = loss.backward()?;
        let row_grads = self.ranker.take_row_gradients(&grads)?;
        mark("backward", &loss)?;
        self.optimizer.step(&grads, &row_grads, 1e-4)?;
        mark("optimizer", &loss)?;
        loss.to_dtype(DType::F64)?.to_scalar::<f64>()
    }
}

/// Scoring at every batch size and the f32 training step at every training batch size, part by
/// part: the median of each part over recorded calls ([`record_parts`]), and the median of as
/// many unrecorded calls (recording waits for the device at every mark, so the parts' sum is the
/// larger).
fn parts(dir: &Path, dtype: &str, only: Option<&str>) -> Result<()> {
    let device = gpu()?;
    match dtype {
        "f32" | "tf32" => set_tf32(dtype == "tf32"),
        other => return Err(format!("parts: unknown dtype {other} (f32 or tf32)").into()),
    }
    let (scoring, training) = match only {
        None => (true, true),
        Some("infer") => (true, false),
        Some("train") => (false, true),
        Some(other) => return Err(format!("parts: unknown mode {other} (infer or train)").into()),
    };
    let timing =
        Timing { warmups: 2, min_runs: 5, max_runs: 5, budget: Duration::ZERO, idle_before_each: Duration::ZERO };
    let ranker = checkpoint::load_for_serving(checkpoint_dir(dir), DType::F32, &device)?;
    let mut rows = Vec::new();
    for b in batch_sizes(&INFER_BATCHES)?.into_iter().filter(|_| scoring) {
        let batch = inputs_to_device(random_batch(ranker.config(), b, b as u64)?, &device)?;
        let call = || -> candle_core::Result<()> {
            ranker.predict(&batch)?.to_device(&Device::Cpu)?;
            Ok(())
        };
        rows.push(part_row("infer", b, timing, &device, call));
    }
    drop(ranker);
    for b in batch_sizes(&TRAIN_BATCHES)?.into_iter().filter(|_| training) {
        let mut step = TrainingStep::load(dir, &device, b)?;
        rows.push(part_row("train", b, timing, &device, || step.run().map(|_| ())));
    }
    println!(
        "{}",
        json!({"framework": "rankstack", "mode": "parts", "dtype": dtype, "device": format!("{device:?}"), "rows": rows})
    );
    Ok(())
}

/// `GPU_BENCH_BATCHES` (comma-separated sizes, for every mode), else `default`.
fn batch_sizes(default: &[usize]) -> Result<Vec<usize>> {
    match std::env::var("GPU_BENCH_BATCHES") {
        Ok(list) => Ok(list.split(',').map(|b| b.trim().parse()).collect::<std::result::Result<_, _>>()?),
        Err(_) => Ok(default.to_vec()),
    }
}

/// One row of [`parts`]: `call` timed unrecorded, then recorded part by part (medians in ms).
fn part_row(
    mode: &str,
    batch: usize,
    timing: Timing,
    device: &Device,
    mut call: impl FnMut() -> candle_core::Result<()>,
) -> serde_json::Value {
    let outcome = (|| -> Result<serde_json::Value> {
        let (unrecorded, runs) = timing::median_seconds(timing, &mut call)?;
        let mut recorded: Vec<Vec<PartTime>> = Vec::new();
        timing::median_seconds(timing, || {
            recorded.push(record_parts(device, &mut call)?.1);
            Ok::<_, candle_core::Error>(())
        })?;
        let recorded = &recorded[timing.warmups..];
        let names: Vec<&str> = recorded[0].iter().map(|p| p.name.as_str()).collect();
        let median_ms = |name: &str| -> f64 {
            let mut v: Vec<f64> =
                recorded.iter().filter_map(|r| r.iter().find(|p| p.name == name)).map(|p| p.seconds * 1e3).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let parts: Vec<serde_json::Value> = names
            .iter()
            .map(|&name| {
                let part = recorded[0].iter().find(|p| p.name == name);
                json!({"part": name, "median_ms": median_ms(name), "count": part.map_or(0, |p| p.count),
                       "memory_growth_bytes": part.and_then(|p| p.memory_growth),
                       "peak_bytes": part.and_then(|p| p.peak_bytes),
                       "tensors_written": part.and_then(|p| p.written).map(|w| w.count),
                       "bytes_written": part.and_then(|p| p.written).map(|w| w.bytes)})
            })
            .collect();
        let sum: f64 = names.iter().map(|&n| median_ms(n)).sum();
        Ok(json!({"mode": mode, "batch": batch, "unrecorded_median_ms": unrecorded * 1e3, "runs": runs,
                  "parts_sum_ms": sum, "parts": parts}))
    })();
    outcome.unwrap_or_else(|e| json!({"mode": mode, "batch": batch, "error": e.to_string()}))
}
