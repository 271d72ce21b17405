//! [`on_worker_pool`]: the kernels' hand-over of a whole forward pass or training step to the CPU
//! worker pool, carrying this crate's per-thread state along.

use candle_core::Device;

/// Runs `f` on a thread of the kernels' worker pool
/// ([`rankstack_kernels::cpu::on_worker_pool`], which carries a forced ISA path along) and also
/// carries the calling thread's per-thread recordings: whether its [`crate::probe`] marks are
/// recorded, so that a recorded CPU forward pass charges its parts although it runs on a worker,
/// and its [`crate::host_read`] recording, so that the worker's reads are counted.
///
/// ```
/// let sum: u64 = rankstack_nn::on_worker_pool(|| (1..=10u64).sum());
/// assert_eq!(sum, 55);
/// ```
pub fn on_worker_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let records = crate::probe::recording_on_this_thread();
    let reads = crate::host_read::take();
    let (out, reads) = rankstack_kernels::cpu::on_worker_pool(move || {
        crate::probe::with_recording_on_this_thread(records, || {
            // The worker may be inside another hand-over (it runs stolen work while it waits
            // in a join): that one's recording is set aside, not overwritten, and put back.
            let outer = crate::host_read::take();
            crate::host_read::give_back(reads);
            let out = f();
            let reads = crate::host_read::take();
            crate::host_read::give_back(outer);
            (out, reads)
        })
    });
    crate::host_read::give_back(reads);
    out
}

/// [`on_worker_pool`] when `device` is the CPU (its kernel calls then queue their tasks locally
/// instead of waking a worker each); on a GPU `f` runs on this thread, which only queues kernels.
pub fn on_worker_pool_for<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        on_worker_pool(f)
    } else {
        f()
    }
}
