//! Every read of a tensor's values back to the host, in one place, and counted.
//!
//! On a GPU a read is a copy to the host that waits for every queued kernel: a step that reads
//! back twice stalls twice. The model's, the trainer's and the server's code read tensors only
//! through the two functions here (`cargo xtask invariants` checks that no other source file of
//! those crates calls candle's `to_vec*`/`to_scalar` or copies to the CPU), so a test can count a
//! step's reads and say where each one came from. candle itself has no hook for its transfers;
//! this is the count at rankstack's side of it.
//!
//! Two kinds of read:
//! - [`read_input`]: values the data pipeline keeps on the host for the host to read (ids,
//!   timestamps, labels, masks given by the caller, tensors from a file). On the host this costs
//!   nothing; when a caller passes such a tensor on a device it is a transfer, and the record says
//!   so ([`HostRead::from_device`]).
//! - [`read_computed`]: values the model computed (the loss, the gradient norm, probabilities,
//!   finiteness sums, weights being saved). On a GPU every such read is a transfer and a wait; on
//!   the CPU it would be one on a GPU, which is what a test on the CPU checks (the training step
//!   reads computed values once).
//!
//! [`record_reads`] collects the reads of the calling thread (and of the worker that
//! [`crate::on_worker_pool`] hands its work to); reads of other threads are not recorded. Outside a
//! recording a read costs one thread-local lookup.
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! use rankstack_nn::host_read::{read_computed, record_reads, Origin};
//! let x = Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?;
//! let (sum, reads) = record_reads(|| read_computed::<f32>(&x.sum_all()?, "sum"));
//! assert_eq!(sum?, vec![6.0]);
//! assert_eq!((reads[0].what, reads[0].origin, reads[0].elements), ("sum", Origin::Computed, 1));
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::cell::RefCell;

use candle_core::{DType, Result, Tensor, WithDType};

/// Where a value read back came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Kept on the host by the data pipeline (ids, labels, masks, file contents).
    Input,
    /// Computed by the model or the trainer.
    Computed,
}

/// One read of a tensor's values to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRead {
    /// What the caller read, e.g. `"loss and squared gradient norm"`.
    pub what: &'static str,
    /// Input kept on the host, or a computed value.
    pub origin: Origin,
    /// Whether the tensor lived on a device other than the CPU (then the read was a transfer).
    pub from_device: bool,
    /// The number of values read.
    pub elements: usize,
    /// Their type.
    pub dtype: DType,
}

thread_local! {
    /// The reads of this thread's running recording (`None`: not recording).
    static LOG: RefCell<Option<Vec<HostRead>>> = const { RefCell::new(None) };
}

/// The values of `t` (flattened, in row-major order) read on the host, where `t` is an input the
/// data pipeline keeps there (a tensor on a device is copied, and the record says it came from
/// the device). `T` must be `t`'s dtype.
pub fn read_input<T: WithDType>(t: &Tensor, what: &'static str) -> Result<Vec<T>> {
    read(t, what, Origin::Input)
}

/// The values of `t` (flattened, in row-major order), a computed tensor, read on the host: on a GPU
/// a copy that waits for the device. `T` must be `t`'s dtype.
pub fn read_computed<T: WithDType>(t: &Tensor, what: &'static str) -> Result<Vec<T>> {
    read(t, what, Origin::Computed)
}

fn read<T: WithDType>(t: &Tensor, what: &'static str, origin: Origin) -> Result<Vec<T>> {
    let values = t.flatten_all()?.to_vec1::<T>()?;
    LOG.with(|log| {
        if let Some(log) = log.borrow_mut().as_mut() {
            let from_device = !t.device().is_cpu();
            log.push(HostRead { what, origin, from_device, elements: values.len(), dtype: t.dtype() });
        }
    });
    Ok(values)
}

/// Runs `f` and returns what it returned with the reads this thread (and the pool worker it hands
/// work to) made meanwhile, in order. A recording inside another one passes its reads on to the
/// outer one as well.
pub fn record_reads<R>(f: impl FnOnce() -> R) -> (R, Vec<HostRead>) {
    /// Puts the outer recording back, with the inner reads appended, also when `f` panics.
    struct Restore(Option<Vec<HostRead>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            LOG.with(|log| {
                let inner = log.replace(None).unwrap_or_default();
                *log.borrow_mut() = outer.map(|mut outer| {
                    outer.extend(inner);
                    outer
                });
            });
        }
    }
    let restore = Restore(LOG.with(|log| log.replace(Some(Vec::new()))));
    let out = f();
    let reads = LOG.with(|log| log.borrow().clone().unwrap_or_default());
    drop(restore);
    (out, reads)
}

/// This thread's recording, taken away to hand to the thread that runs its work: [`give_back`] it
/// there, and when the work is done [`take`] it there and [`give_back`] it here.
pub(crate) fn take() -> Option<Vec<HostRead>> {
    LOG.with(|log| log.replace(None))
}

/// Installs `recording` (from [`take`]) as this thread's.
pub(crate) fn give_back(recording: Option<Vec<HostRead>>) {
    LOG.with(|log| *log.borrow_mut() = recording);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reads_are_recorded_per_thread_with_their_origin_and_nested_recordings_pass_them_on() {
        let dev = Device::Cpu;
        let ids = Tensor::new(&[3i64, 1, 4], &dev).unwrap();
        let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        // Outside a recording a read is just a read.
        assert_eq!(read_input::<i64>(&ids, "ids").unwrap(), [3, 1, 4]);

        let ((), outer) = record_reads(|| {
            assert_eq!(read_input::<i64>(&ids, "ids").unwrap(), [3, 1, 4]);
            // Another thread's reads are not recorded here.
            std::thread::scope(|s| {
                s.spawn(|| read_computed::<f32>(&x, "other thread").unwrap());
            });
            let (sum, inner) = record_reads(|| read_computed::<f32>(&x.sum_all().unwrap(), "sum").unwrap());
            assert_eq!(sum, [10.0]);
            assert_eq!(inner.len(), 1);
            // Values come flattened in row-major order.
            assert_eq!(read_computed::<f32>(&x.t().unwrap(), "transposed").unwrap(), [1.0, 3.0, 2.0, 4.0]);
        });
        let summary: Vec<_> = outer.iter().map(|r| (r.what, r.origin, r.elements, r.from_device)).collect();
        assert_eq!(
            summary,
            [
                ("ids", Origin::Input, 3, false),
                ("sum", Origin::Computed, 1, false),
                ("transposed", Origin::Computed, 4, false)
            ]
        );
        // The recording ended: the thread records nothing now.
        assert!(take().is_none());
        // A wrong dtype is candle's error, not a panic.
        assert!(read_computed::<f64>(&x, "wrong dtype").is_err());
    }

    #[test]
    fn the_worker_pool_carries_the_recording_and_hands_it_back() {
        let x = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
        let ((), reads) = record_reads(|| {
            crate::on_worker_pool(|| read_computed::<f32>(&x, "on a worker").unwrap());
            read_computed::<f32>(&x, "back here").unwrap();
        });
        assert_eq!(reads.iter().map(|r| r.what).collect::<Vec<_>>(), ["on a worker", "back here"]);
    }

    #[test]
    fn concurrent_recordings_on_the_worker_pool_keep_their_own_reads() {
        use rayon::prelude::*;
        // Threads hand work to the same pool at once; a worker waiting in a join runs another
        // thread's hand-over meanwhile, which must not take over (or drop) the recording of the
        // work it interrupted.
        std::thread::scope(|scope| {
            for thread in 0..4usize {
                scope.spawn(move || {
                    let x = Tensor::new(&[thread as f32], &Device::Cpu).unwrap();
                    for round in 0..200 {
                        let ((), reads) = record_reads(|| {
                            crate::on_worker_pool(|| {
                                let spin: u64 = (0..64u64)
                                    .into_par_iter()
                                    .map(|i| (0..2000u64).fold(i, |a, b| a.wrapping_mul(31).wrapping_add(b)))
                                    .reduce(|| 0, u64::wrapping_add);
                                std::hint::black_box(spin);
                                read_computed::<f32>(&x, "mine").unwrap();
                            });
                        });
                        assert_eq!(reads.len(), 1, "thread {thread}, round {round}: {reads:?}");
                    }
                });
            }
        });
    }

    #[test]
    fn a_recording_survives_a_panic_inside_and_ends_cleanly() {
        let caught = std::panic::catch_unwind(|| record_reads(|| panic!("inside")));
        assert!(caught.is_err());
        assert!(take().is_none(), "the panicking recording was ended");
        let ((), reads) = record_reads(|| ());
        assert!(reads.is_empty());
    }
}
