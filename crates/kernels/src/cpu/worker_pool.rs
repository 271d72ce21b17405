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
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let isa = Isa::override_on_this_thread();
    let transfers = host_transfer::take();
    // `scope` runs its closure on a worker of the global pool when called from outside it.
    let (out, transfers) = rayon::scope(|_| {
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
    });
    host_transfer::give_back(transfers);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::isa::with_isa;

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
