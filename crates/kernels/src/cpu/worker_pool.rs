//! Running a whole forward or training step on the kernels' worker pool.
//!
//! Every CPU kernel splits its work with rayon. Called from a thread outside rayon's pool (the
//! `main` thread, a tokio thread), each kernel call *injects* its tasks into the pool and blocks
//! until a worker has run them: two cross-thread wake-ups per kernel call, even when the pool has
//! a single thread, and a forward pass at batch 1 makes hundreds of such calls. Run from inside
//! the pool, a kernel call pushes its tasks onto the calling worker's own queue, runs them there
//! and lets idle workers steal what they can: the sequential parts of a forward pass stay on one
//! thread, and nothing waits for a wake-up to start. This matters most when another process
//! holds a core: a blocked caller then waits for a worker whose core is busy, and a worker waits
//! for a caller that is not running.
//!
//! [`on_worker_pool`] does that, and carries the calling thread's [`Isa`] override
//! ([`with_isa`](super::with_isa)) over to the worker, so that forced paths still apply, and its
//! [`host_transfer`](crate::host_transfer) recording, so that the worker's transfers are counted.

use std::sync::{Arc, Mutex};

use super::isa::{with_isa_override, Isa};
use crate::host_transfer;

/// Runs `f` on a thread of rayon's global pool (the one the kernels use) and returns its result;
/// on the calling thread directly when it already is such a worker. Kernel calls made by `f` then
/// start without a cross-thread wake-up (see the module documentation). A panic in `f` reaches
/// the caller. `f` runs on the worker's stack (rayon's default size unless the application
/// configures the pool), and the caller's thread blocks until it is done.
///
/// ```
/// use rankstack_kernels::cpu::on_worker_pool;
/// let sum: u64 = on_worker_pool(|| (1..=10u64).sum());
/// assert_eq!(sum, 55);
/// ```
pub fn on_worker_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    hand_over(None, f)
}

/// The most rows [`on_worker_pool_for_rows`] counts as a small batch: one whose products are
/// memory-bound matrix-vector products of a few rows, each split into short tasks.
pub const SMALL_BATCH_ROWS: usize = 4;

/// [`on_worker_pool`] for a pass over `rows` rows. A small batch (at most [`SMALL_BATCH_ROWS`])
/// gets no more workers than other processes leave CPUs free
/// ([`load_elsewhere::cpus_busy_elsewhere`](super::load_elsewhere::cpus_busy_elsewhere), rounded
/// to the nearest CPU): each of its products is a few short tasks per worker, and a worker that
/// shares its CPU with another process is preempted in the middle of one while the others wait for
/// it. One thread loaded was faster than two loaded at batch 1 (`docs/performance.md`). Larger
/// batches, an idle machine, or no figure (see [`super::load_elsewhere`]) use the whole pool.
/// The result is the same bits either way: no kernel's arithmetic depends on how many workers
/// share it. `RANKSTACK_LOAD_AWARE=off` turns this off (for comparisons).
pub fn on_worker_pool_for_rows<R: Send>(rows: usize, f: impl FnOnce() -> R + Send) -> R {
    match threads_for_rows(rows) {
        Some(threads) => on_worker_pool_with_threads(threads, f),
        None => on_worker_pool(f),
    }
}

/// The size of the smaller pool a pass over `rows` rows should take, or `None` for the whole pool.
fn threads_for_rows(rows: usize) -> Option<usize> {
    if rows > SMALL_BATCH_ROWS || !load_aware() || rayon::current_thread_index().is_some() {
        return None;
    }
    let busy_elsewhere = super::load_elsewhere::cpus_busy_elsewhere()?;
    // Read once, not per call: `available_parallelism` reads cgroup files every time.
    let cpus = super::load_elsewhere::cpus_counted()?;
    free_cpus_below(rayon::current_num_threads(), cpus, busy_elsewhere)
}

/// The CPUs that `busy_elsewhere` leaves free out of `cpus` (rounded, at least 1), where that is
/// fewer than `workers`.
fn free_cpus_below(workers: usize, cpus: usize, busy_elsewhere: f64) -> Option<usize> {
    let free = (cpus as f64 - busy_elsewhere).round().max(1.0) as usize;
    (free < workers).then_some(free)
}

/// Whether `RANKSTACK_LOAD_AWARE` leaves [`on_worker_pool_for_rows`] on (anything but `off`,
/// read once).
fn load_aware() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RANKSTACK_LOAD_AWARE").map_or(true, |v| v != "off"))
}

/// [`on_worker_pool`] on a pool of `threads` workers of its own (built on first use, kept for the
/// process's life; `threads` is clamped to 1 ..= the global pool's size, and the global pool
/// itself is used at that size). Kernel calls made by `f` split their work over those workers
/// only.
///
/// ```
/// use rankstack_kernels::cpu::on_worker_pool_with_threads;
/// let threads = on_worker_pool_with_threads(1, rayon::current_num_threads);
/// assert_eq!(threads, 1);
/// ```
pub fn on_worker_pool_with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    let threads = threads.clamp(1, rayon::current_num_threads().max(1));
    if threads >= rayon::current_num_threads() || rayon::current_thread_index().is_some() {
        return on_worker_pool(f);
    }
    hand_over(Some(&smaller_pool(threads)), f)
}

/// The process's pool of `threads` workers.
fn smaller_pool(threads: usize) -> Arc<rayon::ThreadPool> {
    static POOLS: Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(Vec::new());
    let mut pools = POOLS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, pool)) = pools.iter().find(|(n, _)| *n == threads) {
        return pool.clone();
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("rankstack-{threads}-worker-{i}"))
        .build()
        .map(Arc::new)
        .unwrap_or_else(|e| panic!("cannot start a pool of {threads} kernel workers: {e}"));
    pools.push((threads, pool.clone()));
    pool
}

/// Runs `f` on a worker of `pool` (rayon's global pool when `None`), carrying the caller's ISA
/// override and transfer recording; in place when this thread already is a worker.
fn hand_over<R: Send>(pool: Option<&rayon::ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let isa = Isa::override_on_this_thread();
    let transfers = host_transfer::take();
    let body = move || {
        // The worker may be inside another hand-over (it runs stolen work while it waits in a
        // join): that one's recording is set aside, not overwritten, and put back (also when `f`
        // panics).
        struct PutBack(Option<Vec<host_transfer::Transfer>>);
        impl Drop for PutBack {
            fn drop(&mut self) {
                host_transfer::give_back(self.0.take());
            }
        }
        let outer = PutBack(host_transfer::take());
        host_transfer::give_back(transfers);
        let out = with_isa_override(isa, f);
        let transfers = host_transfer::take();
        drop(outer);
        (out, transfers)
    };
    // `scope` runs its closure on a worker of the global pool when called from outside it;
    // `install` does the same on a pool of its own.
    let (out, transfers) = match pool {
        None => rayon::scope(|_| body()),
        Some(pool) => pool.install(body),
    };
    host_transfer::give_back(transfers);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::isa::with_isa;

    #[test]
    fn small_batches_get_the_cpus_other_processes_leave_free() {
        // 2 CPUs, 2 workers: a busy loop elsewhere leaves one; background noise leaves both.
        assert_eq!(free_cpus_below(2, 2, 1.0), Some(1));
        assert_eq!(free_cpus_below(2, 2, 0.9), Some(1));
        assert_eq!(free_cpus_below(2, 2, 0.3), None);
        assert_eq!(free_cpus_below(2, 2, 5.0), Some(1), "never fewer than one");
        // 16 CPUs, one busy elsewhere: 15 workers.
        assert_eq!(free_cpus_below(16, 16, 1.1), Some(15));
        // A pool smaller than the free CPUs keeps its size.
        assert_eq!(free_cpus_below(4, 16, 3.0), None);
    }

    #[test]
    fn a_smaller_pool_runs_the_closure_with_that_many_workers_and_carries_the_recordings() {
        let isa = Isa::detected();
        let (threads, forced, transfers) = with_isa(isa, || {
            let ((threads, forced), transfers) = host_transfer::record_transfers(|| {
                on_worker_pool_with_threads(1, || {
                    let x = candle_core::Tensor::new(&[1f32, 2.0], &candle_core::Device::Cpu).unwrap();
                    host_transfer::read_computed::<f32>(&x, "in a smaller pool").unwrap();
                    (rayon::current_num_threads(), Isa::override_on_this_thread())
                })
            });
            (threads, forced, transfers)
        });
        assert_eq!(threads, 1);
        assert_eq!(forced, Some(isa));
        assert_eq!(transfers.len(), 1);
        // Large batches and a pool of at least the global size take the global pool.
        assert_eq!(
            on_worker_pool_for_rows(SMALL_BATCH_ROWS + 1, rayon::current_num_threads),
            rayon::current_num_threads()
        );
        assert_eq!(on_worker_pool_with_threads(usize::MAX, rayon::current_num_threads), rayon::current_num_threads());
    }

    #[test]
    fn runs_on_a_worker_and_returns_the_result() {
        let (index, value) = on_worker_pool(|| (rayon::current_thread_index(), 7));
        assert!(index.is_some(), "the closure ran outside the pool");
        assert_eq!(value, 7);
    }

    #[test]
    fn a_worker_runs_the_closure_in_place() {
        let here = std::thread::current().id();
        let there = on_worker_pool(|| {
            let worker = std::thread::current().id();
            (worker, on_worker_pool(|| std::thread::current().id()))
        });
        assert_ne!(there.0, here);
        assert_eq!(there.0, there.1, "nested call left the worker");
    }

    #[test]
    fn a_forced_path_follows_the_closure() {
        for isa in Isa::all_supported() {
            let seen = with_isa(isa, || on_worker_pool(Isa::active));
            assert_eq!(seen, isa);
        }
        // Without an override on the caller, the worker runs without one too.
        assert_eq!(on_worker_pool(Isa::override_on_this_thread), None);
    }
}
