//! Process-wide allocator tuning for tensor workloads.
//!
//! candle allocates a fresh buffer for the result of every op. glibc's `malloc` serves each
//! request above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it to the
//! kernel on `free`, so every large intermediate tensor costs page faults and the kernel zeroing
//! its pages on first touch. Scoring the `homefeed-bench` model at batch 2048 spent about half its
//! time there (`clear_page_erms` in `perf`): [`retain_freed_memory`] halved that batch's latency.

/// Serves all allocations from one heap and never trims it, so that memory freed by one tensor is
/// reused by the next without page faults. The process keeps the memory it has touched (its RSS
/// stays at its high-water mark); the peak itself does not grow.
///
/// One heap for every thread, because a forward pass or training step runs on whichever worker
/// of the pool picks it up ([`on_worker_pool`](super::on_worker_pool)): with glibc's default
/// per-thread arenas, memory freed on one worker is reused only by allocations on that worker,
/// and each arena grew to a whole step's peak (training at batch 512: 2.5–2.9 instead of 2.0 GiB
/// peak RSS). Small allocations still take glibc's per-thread cache without the heap's lock.
///
/// Process-wide, so applications call it once at start-up, before they start threads (the
/// `rankstack` binary and the benchmarks do); libraries should leave the choice to the
/// application. Effective with glibc on Linux (`mallopt` of `M_MMAP_MAX` 0, `M_TRIM_THRESHOLD`
/// max, `M_ARENA_MAX` 1); elsewhere it does nothing. Returns whether the setting was applied.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Moves the whole 2 MiB pages inside `buf` onto transparent huge pages where the system allows
/// it (Linux: `madvise` with `MADV_HUGEPAGE`, then `MADV_COLLAPSE`, which since Linux 6.1 also
/// converts pages already in use, as freed and reused heap memory is); returns whether the
/// pages were collapsed. The contents stay as they are. For buffers read end to end on every
/// call, such as packed serving weights: scoring one example streams all of them from memory,
/// and with 4 KiB pages every page costs a TLB miss and restarts the hardware prefetcher. A
/// streaming read of 280 MiB on the build machine (AMD EPYC, 2 vCPUs) ran at 32–35 GB/s on one
/// thread with 4 KiB pages and 37–40 with huge pages. Costs one copy of the buffer.
pub fn advise_huge_pages<T>(buf: &mut [T]) -> bool {
    #[cfg(target_os = "linux")]
    {
        /// `MADV_COLLAPSE` of Linux's uapi (not in every libc target's bindings).
        const MADV_COLLAPSE: libc::c_int = 25;
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (first, last) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if first >= last {
            return false;
        }
        let range = (first as *mut libc::c_void, last - first);
        // SAFETY: the range lies within `buf`, which this call borrows mutably; both advices
        // change how its pages are backed, never their contents.
        unsafe {
            libc::madvise(range.0, range.1, libc::MADV_HUGEPAGE);
            libc::madvise(range.0, range.1, MADV_COLLAPSE) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = buf;
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

    #[test]
    fn huge_page_advice_keeps_the_contents() {
        let mut v: Vec<u64> = (0..3u64 << 18).map(|i| i * 3).collect(); // 6 MiB: a whole 2 MiB page
        let collapsed = super::advise_huge_pages(&mut v);
        // Refused only where THP is off, the kernel predates MADV_COLLAPSE, or not Linux.
        let thp_off = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .map_or(true, |mode| mode.contains("[never]"));
        if !collapsed {
            eprintln!("note: huge pages not available here (THP off: {thp_off})");
        }
        assert!(v.iter().enumerate().all(|(i, &x)| x == 3 * i as u64), "contents changed");
        // Too small to hold a whole huge page: nothing to advise.
        assert!(!super::advise_huge_pages(&mut vec![0u8; 4096]));
    }
}
