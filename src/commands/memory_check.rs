//! A batch size too large for this machine is a clear error before anything is allocated: the
//! cost planner's memory estimate ([`ranker_model::cost`]) against the memory available.

use ranker_model::Ranker;
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
/// this machine has available (`MemAvailable` of `/proc/meminfo`; where that cannot be read, only
/// the overflow is checked).
pub fn check_batch_memory(
    ranker: &Ranker,
    batch_size: usize,
    rows: u64,
    workload: Workload,
    command: &str,
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
    if let Some(available) = available_memory_bytes() {
        if needed as u64 > available {
            return Err(Error::input(
                command,
                "batch-size",
                format!(
                    "{batch_size} needs about {:.1} GiB for a batch of {batch} rows (cost planner estimate) but {:.1} GiB \
                     of memory is available; use a smaller --batch-size",
                    gib(needed as u64),
                    gib(available)
                ),
            ));
        }
    }
    Ok(())
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (`None` off Linux or if unreadable).
fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
