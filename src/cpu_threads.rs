//! How rankstack's binaries share the CPU between candle's two thread pools.
//!
//! candle 0.11 runs element-wise CPU ops on tensors of 64 Ki elements or more on its own *barrier
//! pool*: the calling thread hands out chunks, then spins, without yielding, until every worker has
//! finished, and idle workers spin 25 000 rounds before they sleep. rankstack's kernels and candle's
//! matrix products run on rayon's pool instead, whose threads sleep when idle. When a core is
//! taken by another process, a descheduled barrier worker stalls every element-wise op while the
//! caller burns the other core: MovieLens `mlp` training on 2 cores ran at 625 examples/s with a
//! 2-thread barrier pool and 2 900–3 600 with a 1-thread one (AMD EPYC, machine shared with
//! compile jobs; `docs/performance.md`). The element-wise ops are a small part of the work, so
//! giving up their second thread costs little where the machine is idle.

/// Unless `CANDLE_NUM_THREADS` is set, runs candle's element-wise ops on the calling thread alone
/// (a barrier pool without workers), leaving the other cores to rayon's pool. Returns whether it
/// changed the setting. Call it at start-up, before any tensor op and before other threads exist:
/// candle reads the variable once, when it first needs the pool.
pub fn single_threaded_elementwise_ops() -> bool {
    if std::env::var_os("CANDLE_NUM_THREADS").is_some() {
        return false;
    }
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    true
}

/// Starts the kernels' worker pool with each worker pinned to its own CPU
/// ([`rankstack_kernels::cpu::pinning`]: why, and what it costs when other processes compete for
/// the cores) and returns each worker's CPU. `rankstack serve --pin-threads` calls it before
/// loading the model; it fails if any kernel has run already.
pub fn pin_kernel_workers() -> rankstack_nn::Result<Vec<usize>> {
    rankstack_kernels::cpu::start_pinned_pool()
        .map_err(|e| rankstack_nn::Error::config("serve", "pin-threads", e.to_string()))
}
