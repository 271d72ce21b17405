//! Timing shared by the benchmark examples (`bench_compare`, `gpu_bench`).

use std::time::{Duration, Instant};

/// How a benchmark times one call.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Untimed calls first.
    pub warmups: usize,
    /// Timed calls at least.
    pub min_runs: usize,
    /// Timed calls at most.
    pub max_runs: usize,
    /// Keep calling until this much time has passed (within the run bounds).
    pub budget: Duration,
    /// An untimed pause before each timed call (zero: back to back), for the first call after an
    /// idle gap, as a server between requests sees it.
    pub idle_before_each: Duration,
}

/// The median seconds of `f` over the runs of `timing`, and the number of timed runs.
pub fn median_seconds<E>(timing: Timing, mut f: impl FnMut() -> Result<(), E>) -> Result<(f64, usize), E> {
    for _ in 0..timing.warmups {
        f()?;
    }
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < timing.min_runs || (started.elapsed() < timing.budget && times.len() < timing.max_runs) {
        if !timing.idle_before_each.is_zero() {
            std::thread::sleep(timing.idle_before_each);
        }
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times.len()))
}
