//! [`on_worker_pool`]: the kernels' hand-over of a whole forward pass or training step to the CPU
//! worker pool, carrying this crate's per-thread state along.

/// Runs `f` on a thread of the kernels' worker pool
/// ([`rankstack_kernels::cpu::on_worker_pool`], which carries a forced ISA path along) and also
/// carries whether the calling thread's [`crate::probe`] marks are recorded, so that a recorded
/// CPU forward pass charges its parts although it runs on a worker.
///
/// ```
/// let sum: u64 = rankstack_nn::on_worker_pool(|| (1..=10u64).sum());
/// assert_eq!(sum, 55);
/// ```
pub fn on_worker_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let records = crate::probe::recording_on_this_thread();
    rankstack_kernels::cpu::on_worker_pool(move || crate::probe::with_recording_on_this_thread(records, f))
}
