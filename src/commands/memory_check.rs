//! A batch size too large for this machine is a clear error before anything is allocated: the
//! cost planner's memory estimate ([`ranker_model::cost`]) against the memory available.

use ranker_model::{Ranker, RankerConfig};
use rankstack_nn::{Error, Result};

/// Which memory figure of the cost planner applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// One AdamW training step: parameters, gradients, moments and every activation.
    Training,
    /// A forward pass: parameters and the largest module's activations.
    Inference,
}

/// Refuses `batch_size` for `command` when the cost planner's estimate for one batch (at most
/// `rows` rows: a batch never holds more rows than the data) overflows, or exceeds the memory
/// `device` has free (on the CPU `MemAvailable` of `/proc/meminfo`, on a GPU the driver's free
/// memory; where that cannot be read, only the overflow is checked).
pub fn check_batch_memory(
    ranker: &Ranker,
    batch_size: usize,
    rows: u64,
    workload: Workload,
    command: &str,
    device: &candle_core::Device,
) -> Result<()> {
    let rows = usize::try_from(rows).unwrap_or(usize::MAX).max(1);
    let batch = batch_size.min(rows);
    let cost = ranker.cost(batch);
    let needed = match workload {
        Workload::Training => cost.checked_training_bytes(),
        Workload::Inference => cost.checked_inference_bytes(),
    };
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    let Some(needed) = needed else {
        return Err(Error::input(
            command,
            "batch-size",
            format!("{batch_size} is out of range: its memory estimate overflows"),
        ));
    };
    if let Some(available) = available_memory_bytes(device) {
        if needed as u64 > available {
            return Err(Error::input(
                command,
                "batch-size",
                format!(
                    "{batch_size} needs about {:.1} GiB for a batch of {batch} rows (cost planner estimate) but {:.1} GiB \
                     of memory is available on {}; use a smaller --batch-size",
                    gib(needed as u64),
                    gib(available),
                    if device.is_cpu() { "this machine" } else { "the device" }
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses, before a model is built from `config`, embedding tables (the sizes a config or a data
/// file's schema can make arbitrarily large: `cardinality` is a number read from the file) whose
/// f32 weights alone overflow or exceed the available memory. The largest table is named.
pub fn check_config_memory(config: &RankerConfig, command: &str) -> Result<()> {
    let mut tables: Vec<(String, Option<usize>)> = config
        .features
        .sparse
        .iter()
        .map(|s| {
            let rows = s.cardinality.checked_add(1);
            (format!("feature `{}`", s.name), rows.and_then(|r| r.checked_mul(s.embedding_dim())))
        })
        .collect();
    if let (Some(items), Some(seq)) = (&config.item_embedding, &config.sequence) {
        let rows = items.cardinality.checked_add(1);
        tables.push(("the item table".into(), rows.and_then(|r| r.checked_mul(seq.item_dim))));
    }
    let total = tables.iter().try_fold(0usize, |acc, (_, n)| n.and_then(|n| acc.checked_add(n)));
    let bytes = total.and_then(|t| t.checked_mul(4));
    let largest = tables.iter().max_by_key(|(_, n)| n.unwrap_or(usize::MAX)).map(|(name, _)| name.as_str());
    let too_big = |what: String| {
        Err(Error::input(command, "config", format!("{what}; the largest is {}", largest.unwrap_or("none"))))
    };
    match (bytes, available_memory_bytes(&candle_core::Device::Cpu)) {
        (None, _) => too_big("the embedding tables' sizes overflow (a cardinality or width out of range)".into()),
        (Some(b), Some(available)) if b as u64 > available => too_big(format!(
            "the embedding tables need {:.1} GiB of weights but {:.1} GiB of memory is available",
            b as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        )),
        _ => Ok(()),
    }
}

/// What `device` has free ([`rankstack_nn::device_memory`]), if it can be read.
fn available_memory_bytes(device: &candle_core::Device) -> Option<u64> {
    rankstack_nn::device_memory::device_memory(device).ok().map(|m| m.free)
}
