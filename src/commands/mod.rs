//! The `rankstack` command line's subcommands, as library functions (the binary only parses
//! arguments and prints errors): train, eval, score, serve, inspect, presets, data, import.

mod data;
mod import;
mod memory_check;
mod output;
mod predict;
mod serve;
mod train;

pub use data::{data_movielens, data_synthetic};
pub use import::{import, ImportArgs, ImportSource};
pub use memory_check::{check_batch_memory, check_config_memory, Workload};
pub use output::check_output;
pub use predict::{eval, score};
pub use serve::{serve, ServeOptions};
pub use train::{train, TrainArgs};

use ranker_model::{presets, Ranker, RankerConfig, TrainingCalibration};
use rankstack_nn::{Result, SeededVarMap};

/// `rankstack presets`: one line per preset.
pub fn presets_listing() -> String {
    let describe = |name: &str| match name {
        "pinterest-homefeed" => {
            "the paper's final model: parallel MaskNet 3x512 (ratio 2.0), then 4 full-rank DCNv2; MLP 512-256"
        }
        "pinterest-baseline" => "the paper's baseline: 4 full-rank DCNv2 with the input skip; MLP 1024-512-256",
        "dcnv2" => "4 full-rank DCNv2 layers; MLP 512-256",
        "masknet-parallel" => "parallel MaskNet 3x512 (ratio 2.0); MLP 512-256",
        "masknet-serial" => "serial MaskNet 3x512 (ratio 2.0); MLP 512-256",
        "mlp" => "no interaction layers; MLP 1024-512-256",
        "homefeed-bench" => "pinterest-homefeed under the name that `cargo xtask bench-compare` times",
        _ => "",
    };
    presets::NAMES.iter().map(|n| format!("{n:<20} {}\n", describe(n))).collect()
}

/// The architecture to train: a preset, or a config file (which wins).
pub fn architecture(preset: &str, config: Option<&std::path::Path>) -> Result<RankerConfig> {
    match config {
        Some(path) => RankerConfig::from_file(path),
        None => presets::preset(preset),
    }
}

/// `rankstack inspect`: the cost planner's table for a preset or config at a batch size, and
/// whether one training step fits in `fraction` of `device_memory_gib`.
pub fn inspect(
    preset: &str,
    config: Option<&std::path::Path>,
    batch_size: usize,
    device_memory_gib: Option<f64>,
    fraction: f64,
) -> Result<String> {
    if batch_size == 0 {
        return Err(rankstack_nn::Error::config("inspect", "batch-size", "must be > 0"));
    }
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(rankstack_nn::Error::config("inspect", "fraction", "must be in (0, 1]"));
    }
    let config = architecture(preset, config)?;
    check_config_memory(&config, "inspect")?;
    let store = SeededVarMap::new(0);
    let ranker = Ranker::new(&config, store.var_builder(candle_core::DType::F32, &candle_core::Device::Cpu))?;
    let report = ranker.cost(batch_size);
    if report.checked_training_bytes().is_none() {
        return Err(rankstack_nn::Error::config(
            "inspect",
            "batch-size",
            format!("{batch_size} is out of range: its memory figures overflow"),
        ));
    }
    let mut out = format!("{report}");
    // What `train --device cuda` plans: the GPU's measured activation factor and the next batch's
    // inputs, copied while a step runs (docs/cost-planner.md).
    let (gpu, bf16) = (TrainingCalibration::CUDA, TrainingCalibration::CUDA_BF16_AUTOCAST);
    let gib_of = |bytes: usize| bytes as f64 / (1u64 << 30) as f64;
    out.push_str(&format!(
        "one batch of inputs on the device: {:.3} GiB; on a CUDA GPU (activations x {} as measured, \
         plus the next batch's inputs) a training step is planned at {:.3} GiB ({:.3} GiB under bf16 autocast, \
         activations x {})\n",
        gib_of(report.input_bytes()),
        gpu.activation_factor,
        gib_of(report.calibrated_training_bytes(gpu)),
        gib_of(report.calibrated_training_bytes(bf16)),
        bf16.activation_factor,
    ));
    if let Some(gib) = device_memory_gib {
        if !(gib.is_finite() && gib > 0.0) {
            return Err(rankstack_nn::Error::config("inspect", "device-memory-gib", "must be > 0"));
        }
        let bytes = (gib * (1u64 << 30) as f64) as usize;
        let verdict = if report.training_fits(bytes, fraction) { "fits" } else { "does NOT fit" };
        out.push_str(&format!(
            "training at batch {batch_size} {verdict} in {:.0}% of {gib} GiB; the largest batch that fits is {} \
             ({} on a CUDA GPU, {} with --precision bf16: what `train --batch-size auto` picks there)\n",
            fraction * 100.0,
            report.max_training_batch(bytes, fraction),
            report.max_training_batch_calibrated(bytes, fraction, gpu),
            report.max_training_batch_calibrated(bytes, fraction, bf16)
        ));
    }
    Ok(out)
}
