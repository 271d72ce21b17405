//! Process-wide allocator tuning for tensor workloads.
//!
//! candle allocates a fresh buffer for the result of every op. glibc's `malloc` serves each
//! request above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it to the
//! kernel on `free`, so every large intermediate tensor costs page faults and the kernel zeroing
//! its pages on first touch. Scoring the `homefeed-bench` model at batch 2048 spent about half its
//! time there (`clear_page_erms` in `perf`): [`retain_freed_memory`] halved that batch's latency.

/// Serves all allocations from the heap and never trims it, so that memory freed by one tensor is
/// reused by the next without page faults. The process keeps the memory it has touched (its RSS
/// stays at its high-water mark); the peak itself does not grow.
///
/// Process-wide, so applications call it once at start-up (the `rankstack` binary and the
/// benchmarks do); libraries should leave the choice to the application. Effective with glibc on
/// Linux (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, max)`); elsewhere it does nothing.
/// Returns whether the setting was applied.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn applies_on_glibc_and_allocation_still_works() {
        let applied = super::retain_freed_memory();
        assert_eq!(applied, cfg!(all(target_os = "linux", target_env = "gnu")));
        // A large allocation after the switch comes from the heap and is usable and zeroed.
        let v = vec![0f32; 16 << 20];
        assert!(v.iter().step_by(4096).all(|&x| x == 0.0));
    }
}
