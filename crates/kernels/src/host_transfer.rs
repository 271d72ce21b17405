//! Every copy of tensor values between the host and a device, in one place, and counted.
//!
//! On a GPU a read back to the host is a copy that waits for every queued kernel: a step that
//! reads back twice stalls twice. A copy to the device does not wait, but it is traffic the issue
//! budget counts (one batch of inputs in per step), and a copy made on every call that could have
//! been made once is a defect. The workspace's library code moves tensor values across only
//! through the functions here (`cargo xtask invariants` checks that no other source file of the
//! crates or the top package calls candle's `to_vec*`/`to_scalar`, `Tensor::new`/`from_vec`/
//! `from_slice`/`arange` on a device other than a literal `Device::Cpu`, or `to_device`), so a test
//! can list a step's transfers and say where each one came from. candle itself has no hook for
//! its copies; this is the count at rankstack's side of them. candle's own scalar constants
//! (`maximum(0.0)`, `clamp`) are made inside candle and are not in the count.
//!
//! Reads ([`Direction::ToHost`]):
//! - [`read_input`]: values the data pipeline keeps on the host for the host to read (ids,
//!   timestamps, labels, masks given by the caller, tensors from a file). On the host this costs
//!   nothing; when a caller passes such a tensor on a device it is a copy, and the record says so
//!   ([`Transfer::crosses`]).
//! - [`read_computed`]: values the model computed (the loss, the gradient norm, probabilities,
//!   finiteness sums, weights being saved).
//!
//! Writes ([`Direction::ToDevice`]): [`upload`] (values built on the host) and [`move_to_device`]
//! (a tensor, usually a CPU one, placed on a device), each with the [`Origin`] of its values.
//!
//! Every call is recorded, also on the CPU, where nothing is copied: a test on the CPU then checks
//! what a GPU would have copied ([`Transfer::crosses`] says whether this one did).
//! [`record_transfers`] collects the transfers of the calling thread (and of the worker that
//! [`crate::cpu::on_worker_pool`] hands its work to); those of other threads are not recorded.
//! Outside a recording a transfer costs one thread-local lookup.
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! use rankstack_kernels::host_transfer::{read_computed, record_transfers, upload, Direction, Origin};
//! let dev = Device::Cpu;
//! let (sum, transfers) = record_transfers(|| {
//!     let x = upload(vec![1f32, 2., 3.], 3, &dev, "values", Origin::Input)?;
//!     read_computed::<f32>(&x.sum_all()?, "sum")
//! });
//! assert_eq!(sum?, vec![6.0]);
//! let seen: Vec<_> = transfers.iter().map(|t| (t.direction, t.what, t.origin, t.elements)).collect();
//! assert_eq!(seen, [(Direction::ToDevice, "values", Origin::Input, 3), (Direction::ToHost, "sum", Origin::Computed, 1)]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::cell::RefCell;

use candle_core::{DType, Device, Result, Shape, Tensor, WithDType};

/// Which way values went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Read back to the host.
    ToHost,
    /// Placed on the tensor's device.
    ToDevice,
}

/// Where the values of a transfer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The data pipeline's batch, or values the host derived from it (ids, index maps, padding
    /// masks, row lists, labels): what a step has to bring in.
    Input,
    /// Computed by the model or the trainer.
    Computed,
    /// Random draws made on the host (dropout's multipliers), so that every device draws the same
    /// stream.
    Random,
    /// Fixed by the configuration or the shapes alone (positions, task weights).
    Constant,
    /// Parameters, buffers and optimizer state: initial values, or loaded from a checkpoint.
    State,
}

/// One copy of tensor values between the host and a tensor's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Which way the values went.
    pub direction: Direction,
    /// What the caller moved, e.g. `"loss and squared gradient norm"`.
    pub what: &'static str,
    /// Where the values came from.
    pub origin: Origin,
    /// Whether the device side was a device other than the CPU: then the values were copied
    /// between host and device memory. On the CPU the call is recorded all the same.
    pub crosses: bool,
    /// The number of values.
    pub elements: usize,
    /// Their type.
    pub dtype: DType,
}

thread_local! {
    /// The transfers of this thread's running recording (`None`: not recording).
    static LOG: RefCell<Option<Vec<Transfer>>> = const { RefCell::new(None) };
}

fn log(transfer: impl FnOnce() -> Transfer) {
    LOG.with(|log| {
        if let Some(log) = log.borrow_mut().as_mut() {
            log.push(transfer());
        }
    });
}

/// The values of `t` (flattened, in row-major order) read on the host, where `t` is an input the
/// data pipeline keeps there (a tensor on a device is copied, and the record says it crossed).
/// `T` must be `t`'s dtype.
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
    let (crosses, elements, dtype) = (!t.device().is_cpu(), values.len(), t.dtype());
    log(|| Transfer { direction: Direction::ToHost, what, origin, crosses, elements, dtype });
    Ok(values)
}

/// A tensor of `shape` on `device` holding `values` (row-major), built on the host: on a GPU a
/// copy to the device, on the CPU the vector itself. Fails, as candle does, when the shape does
/// not hold `values.len()` elements.
pub fn upload<T: WithDType>(
    values: Vec<T>,
    shape: impl Into<Shape>,
    device: &Device,
    what: &'static str,
    origin: Origin,
) -> Result<Tensor> {
    let elements = values.len();
    let t = Tensor::from_vec(values, shape, device)?;
    log(|| Transfer {
        direction: Direction::ToDevice,
        what,
        origin,
        crosses: !device.is_cpu(),
        elements,
        dtype: T::DTYPE,
    });
    Ok(t)
}

/// [`upload`] from a borrowed slice (copied on the CPU too, as candle's `Tensor::from_slice` does).
pub fn upload_slice<T: WithDType>(
    values: &[T],
    shape: impl Into<Shape>,
    device: &Device,
    what: &'static str,
    origin: Origin,
) -> Result<Tensor> {
    upload(values.to_vec(), shape, device, what, origin)
}

/// `t` on `device`: the same tensor when it is there already, else a copy. Recorded as a write
/// to `device` (crossing when either side is not the CPU).
pub fn move_to_device(t: &Tensor, device: &Device, what: &'static str, origin: Origin) -> Result<Tensor> {
    let moved = t.to_device(device)?;
    let crosses = !(device.is_cpu() && t.device().is_cpu());
    log(|| Transfer {
        direction: Direction::ToDevice,
        what,
        origin,
        crosses,
        elements: t.elem_count(),
        dtype: t.dtype(),
    });
    Ok(moved)
}

/// Runs `f` and returns what it returned with the transfers this thread (and the pool worker it
/// hands work to) made meanwhile, in order. A recording inside another one passes its transfers on
/// to the outer one as well.
pub fn record_transfers<R>(f: impl FnOnce() -> R) -> (R, Vec<Transfer>) {
    /// Ends this recording and puts the outer one back with this one's transfers appended (also
    /// when `f` panics); returns this recording's transfers.
    struct Restore(Option<Option<Vec<Transfer>>>);
    impl Restore {
        fn end(&mut self) -> Vec<Transfer> {
            let inner = LOG.with(|log| log.replace(None)).unwrap_or_default();
            let outer = self.0.take().flatten().map(|mut outer| {
                outer.extend(inner.iter().cloned());
                outer
            });
            LOG.with(|log| *log.borrow_mut() = outer);
            inner
        }
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            if self.0.is_some() {
                self.end();
            }
        }
    }
    let mut restore = Restore(Some(LOG.with(|log| log.replace(Some(Vec::new())))));
    let out = f();
    let transfers = restore.end();
    (out, transfers)
}

/// Adds `transfers`, made by another thread on this thread's behalf (the batch copied ahead by
/// a helper thread, `record_transfers` there), to this thread's running recording, if any.
pub fn record_as_mine(transfers: impl IntoIterator<Item = Transfer>) {
    LOG.with(|log| {
        if let Some(log) = log.borrow_mut().as_mut() {
            log.extend(transfers);
        }
    });
}

/// This thread's recording, taken away to hand to the thread that runs its work: [`give_back`] it
/// there, and when the work is done [`take`] it there and [`give_back`] it here.
pub(crate) fn take() -> Option<Vec<Transfer>> {
    LOG.with(|log| log.replace(None))
}

/// Installs `recording` (from [`take`]) as this thread's.
pub(crate) fn give_back(recording: Option<Vec<Transfer>>) {
    LOG.with(|log| *log.borrow_mut() = recording);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(transfers: &[Transfer]) -> Vec<(Direction, &'static str, Origin, usize, bool)> {
        transfers.iter().map(|t| (t.direction, t.what, t.origin, t.elements, t.crosses)).collect()
    }

    #[test]
    fn transfers_are_recorded_per_thread_with_their_origin_and_nested_recordings_pass_them_on() {
        let dev = Device::Cpu;
        let ids = Tensor::new(&[3i64, 1, 4], &dev).unwrap();
        let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        // Outside a recording a read is just a read.
        assert_eq!(read_input::<i64>(&ids, "ids").unwrap(), [3, 1, 4]);

        let ((), outer) = record_transfers(|| {
            assert_eq!(read_input::<i64>(&ids, "ids").unwrap(), [3, 1, 4]);
            // Another thread's transfers are not recorded here.
            std::thread::scope(|s| {
                s.spawn(|| read_computed::<f32>(&x, "other thread").unwrap());
            });
            let (sum, inner) = record_transfers(|| read_computed::<f32>(&x.sum_all().unwrap(), "sum").unwrap());
            assert_eq!(sum, [10.0]);
            assert_eq!(inner.len(), 1);
            // Values come flattened in row-major order.
            assert_eq!(read_computed::<f32>(&x.t().unwrap(), "transposed").unwrap(), [1.0, 3.0, 2.0, 4.0]);
            let up = upload(vec![1u32, 2, 3, 4, 5, 6], (2, 3), &dev, "index", Origin::Input).unwrap();
            assert_eq!(up.dims(), [2, 3]);
            let up = upload_slice(&[0.5f64], 1, &dev, "scale", Origin::Constant).unwrap();
            assert_eq!(up.dtype(), DType::F64);
            let moved = move_to_device(&x, &dev, "batch input", Origin::Input).unwrap();
            assert_eq!(moved.dims(), [2, 2]);
        });
        use Direction::*;
        assert_eq!(
            summary(&outer),
            [
                (ToHost, "ids", Origin::Input, 3, false),
                (ToHost, "sum", Origin::Computed, 1, false),
                (ToHost, "transposed", Origin::Computed, 4, false),
                (ToDevice, "index", Origin::Input, 6, false),
                (ToDevice, "scale", Origin::Constant, 1, false),
                (ToDevice, "batch input", Origin::Input, 4, false),
            ]
        );
        assert_eq!(outer[3].dtype, DType::U32);
        // The recording ended: the thread records nothing now.
        assert!(take().is_none());
        // A wrong dtype or shape is candle's error, not a panic, and is not recorded.
        let ((), failed) = record_transfers(|| {
            assert!(read_computed::<f64>(&x, "wrong dtype").is_err());
            assert!(upload(vec![1f32, 2., 3.], (2, 2), &dev, "wrong shape", Origin::Input).is_err());
        });
        assert!(failed.is_empty(), "{failed:?}");
    }

    #[test]
    fn the_worker_pool_carries_the_recording_and_hands_it_back() {
        let x = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
        let ((), transfers) = record_transfers(|| {
            crate::cpu::on_worker_pool(|| read_computed::<f32>(&x, "on a worker").unwrap());
            read_computed::<f32>(&x, "back here").unwrap();
        });
        assert_eq!(transfers.iter().map(|r| r.what).collect::<Vec<_>>(), ["on a worker", "back here"]);
    }

    #[test]
    fn transfers_of_a_helper_thread_join_the_recording_they_are_handed_to() {
        let x = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
        let (_, helper) =
            std::thread::scope(|s| s.spawn(|| record_transfers(|| read_input::<f32>(&x, "helper"))).join().unwrap());
        // Outside a recording they go nowhere.
        record_as_mine(helper.clone());
        let ((), mine) = record_transfers(|| {
            read_input::<f32>(&x, "mine").unwrap();
            record_as_mine(helper);
        });
        assert_eq!(mine.iter().map(|t| t.what).collect::<Vec<_>>(), ["mine", "helper"]);
    }

    #[test]
    fn concurrent_recordings_on_the_worker_pool_keep_their_own_transfers() {
        use rayon::prelude::*;
        // Threads hand work to the same pool at once; a worker waiting in a join runs another
        // thread's hand-over meanwhile, which must not take over (or drop) the recording of the
        // work it interrupted.
        std::thread::scope(|scope| {
            for thread in 0..4usize {
                scope.spawn(move || {
                    let x = Tensor::new(&[thread as f32], &Device::Cpu).unwrap();
                    for round in 0..200 {
                        let ((), transfers) = record_transfers(|| {
                            crate::cpu::on_worker_pool(|| {
                                let spin: u64 = (0..64u64)
                                    .into_par_iter()
                                    .map(|i| (0..2000u64).fold(i, |a, b| a.wrapping_mul(31).wrapping_add(b)))
                                    .reduce(|| 0, u64::wrapping_add);
                                std::hint::black_box(spin);
                                read_computed::<f32>(&x, "mine").unwrap();
                            });
                        });
                        assert_eq!(transfers.len(), 1, "thread {thread}, round {round}: {transfers:?}");
                    }
                });
            }
        });
    }

    #[test]
    fn a_recording_survives_a_panic_inside_and_ends_cleanly() {
        let caught = std::panic::catch_unwind(|| record_transfers(|| panic!("inside")));
        assert!(caught.is_err());
        assert!(take().is_none(), "the panicking recording was ended");
        let ((), transfers) = record_transfers(|| ());
        assert!(transfers.is_empty());
    }
}
