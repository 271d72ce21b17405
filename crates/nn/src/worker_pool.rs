//! [`on_worker_pool`]: the kernels' hand-over of a whole forward pass or training step to the CPU
//! worker pool, carrying this crate's per-thread state along.

use candle_core::Device;

/// Runs `f` on a thread of the kernels' worker pool
/// ([`rankstack_kernels::cpu::on_worker_pool`], which carries a forced ISA path along) and also
/// carries whether the calling thread's its [`crate::probe`] marks are
/// recorded, so that a recorded CPU forward pass charges its parts although it runs on a worker.
/// (The kernels' hand-over itself carries the [`crate::host_transfer`] recording.)
///
/// ```
/// let sum: u64 = rankstack_nn::on_worker_pool(|| (1..=10u64).sum());
/// assert_eq!(sum, 55);
/// ```
pub fn on_worker_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rankstack_kernels::cpu::on_worker_pool(carrying_probe(f))
}

/// `f`, to run on a worker with the calling thread's [`crate::probe`] recording.
fn carrying_probe<R: Send>(f: impl FnOnce() -> R + Send) -> impl FnOnce() -> R + Send {
    let records = crate::probe::recording_on_this_thread();
    move || crate::probe::with_recording_on_this_thread(records, f)
}

/// [`on_worker_pool_for`] for a pass over `rows` rows: on the CPU, a small batch gets no more
/// workers than other processes leave CPUs free ([`rankstack_kernels::cpu::on_worker_pool_for_rows`]).
pub fn on_worker_pool_for_rows<R: Send>(device: &Device, rows: usize, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        rankstack_kernels::cpu::on_worker_pool_for_rows(rows, carrying_probe(f))
    } else {
        f()
    }
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
