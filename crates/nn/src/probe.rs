//! Where a forward pass spends its time, part by part, on any device.
//!
//! Layers call [`mark`] after each part of their forward pass, naming the work since the previous
//! mark (`"transformer.attention"`, `"masknet"`, …). Outside a recording a mark costs one atomic
//! load. Inside [`record_parts`] it waits for the device of the part's output
//! ([`candle_core::Device::synchronize`]: a GPU queues kernels and returns at once, so without it
//! a part's time would land on whichever later part first waits) and charges the time since the
//! previous mark to that part. Parts of the same name add up (two encoder layers give one
//! `"transformer.attention"` row, `count` 2).
//!
//! Each part also records how the memory its device's tensors hold changed over it
//! ([`crate::device_memory::tensor_bytes_in_use`]: a GPU's pool, or the CPU's heap where the
//! program counts it), and the most they held during it: in a training forward pass, what a part
//! adds stays alive until the backward pass, so those columns are where a step's memory goes. A
//! recording resets the device's peak measurement ([`crate::device_memory::reset_peak`]) at
//! every mark.
//!
//! Waiting at every mark stops the host from running ahead of the device, so a recorded call is
//! slower than an unrecorded one by the overlap it loses; compare the parts' sum with an unrecorded
//! call of the same batch. Host work between marks (reading inputs back, building index vectors)
//! is charged to the part it precedes, which is the point: on a GPU that is time the device waits.
//!
//! One recording runs at a time in a process; a second [`record_parts`] while one runs is an
//! error. Only marks from the recording thread count, and from a worker that
//! [`crate::on_worker_pool`] hands its work to (the CPU forward pass runs there): forward passes of
//! other threads (a server's other requests, parallel tests) are not charged.
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! use rankstack_nn::probe::{mark, record_parts};
//! let x = Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu)?;
//! let (y, parts) = record_parts(&Device::Cpu, || {
//!     let h = (&x * 2.0)?;
//!     mark("double", &h)?;
//!     let y = h.sum_all()?;
//!     mark("sum", &y)?;
//!     Ok(y)
//! })?;
//! assert_eq!(y.to_scalar::<f32>()?, 12.0);
//! let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
//! assert_eq!(names, ["double", "sum", "rest"]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use rankstack_kernels::cpu::heap_count::buffers_allocated;
pub use rankstack_kernels::cpu::heap_count::BuffersAllocated;

/// Whether a recording runs (the only thing an unrecorded [`mark`] reads).
static RECORDING: AtomicBool = AtomicBool::new(false);
/// The running recording.
static STATE: Mutex<Option<Recording>> = Mutex::new(None);

thread_local! {
    /// Whether this thread's marks are charged to the running recording.
    static THREAD_RECORDS: Cell<bool> = const { Cell::new(false) };
}

/// The name [`record_parts`] gives the time after the last mark (until the call returns and its
/// device is idle).
pub const REST: &str = "rest";

/// One part's time in a recorded call.
#[derive(Debug, Clone, PartialEq)]
pub struct PartTime {
    /// The name its marks gave.
    pub name: String,
    /// Seconds, summed over its marks.
    pub seconds: f64,
    /// How many marks charged it.
    pub count: usize,
    /// The change of the bytes the device's tensors hold, summed over its marks (`None` where the
    /// device does not say: a CPU program that does not count its heap).
    pub memory_growth: Option<i64>,
    /// The most bytes the device's tensors held at once during the part (the largest over its
    /// marks; `None` where the device does not say).
    pub peak_bytes: Option<u64>,
    /// The tensors the part wrote, and their bytes, summed over its marks: on the CPU of a program
    /// that counts its heap, the tensor-aligned buffers of at least 4 KiB it allocated
    /// ([`rankstack_kernels::cpu::heap_count::buffers_allocated`]). With the CPU kernels off
    /// (`RANKSTACK_CPU=candle`) these are the kernels a GPU launches for the part and the bytes
    /// they write, counted without a GPU. `None` elsewhere (a GPU's pool counts no allocations).
    pub written: Option<BuffersAllocated>,
}

#[derive(Debug)]
struct Recording {
    device: Device,
    last: Instant,
    last_bytes: Option<u64>,
    last_written: Option<BuffersAllocated>,
    parts: Vec<PartTime>,
}

impl Recording {
    fn charge(&mut self, name: &str, now: Instant) -> Result<()> {
        let seconds = now.duration_since(self.last).as_secs_f64();
        let bytes = bytes_in_use(&self.device)?;
        // Where the device counts its tensors: the pool's (or heap's) high-water mark since the
        // previous mark, which reset it; a mark after no allocation at all may read 0, so the bytes
        // at either end bound it from below.
        let peak = match bytes {
            Some(now) => {
                let high = crate::device_memory::peak_tensor_bytes(&self.device).map_err(memory_error)?;
                Some(high.max(now).max(self.last_bytes.unwrap_or(0)))
            }
            None => None,
        };
        let growth = match (bytes, self.last_bytes) {
            (Some(now), Some(before)) => Some(now as i64 - before as i64),
            _ => None,
        };
        let written_now = buffers_written(&self.device);
        let written = written_now
            .zip(self.last_written)
            .map(|(now, before)| BuffersAllocated { count: now.count - before.count, bytes: now.bytes - before.bytes });
        (self.last, self.last_bytes, self.last_written) = (now, bytes, written_now);
        match self.parts.iter_mut().find(|p| p.name == name) {
            Some(p) => {
                p.seconds += seconds;
                p.count += 1;
                p.memory_growth = p.memory_growth.zip(growth).map(|(a, b)| a + b);
                p.peak_bytes = p.peak_bytes.max(peak);
                p.written = p
                    .written
                    .zip(written)
                    .map(|(a, b)| BuffersAllocated { count: a.count + b.count, bytes: a.bytes + b.bytes });
            }
            None => self.parts.push(PartTime {
                name: name.to_string(),
                seconds,
                count: 1,
                memory_growth: growth,
                peak_bytes: peak,
                written,
            }),
        }
        reset_part_peak(&self.device)
    }
}

/// The buffers allocated so far where they are counted (the CPU of a counting program).
fn buffers_written(device: &Device) -> Option<BuffersAllocated> {
    match device {
        Device::Cpu => buffers_allocated(),
        _ => None,
    }
}

fn bytes_in_use(device: &Device) -> Result<Option<u64>> {
    crate::device_memory::tensor_bytes_in_use(device).map_err(memory_error)
}

fn reset_part_peak(device: &Device) -> Result<()> {
    crate::device_memory::reset_peak(device).map_err(memory_error)
}

fn memory_error(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Ends the part `name` here: inside [`record_parts`], waits for `output`'s device and charges the
/// time since the previous mark to `name`; otherwise does nothing.
pub fn mark(name: &str, output: &Tensor) -> Result<()> {
    if !RECORDING.load(Ordering::Relaxed) || !recording_on_this_thread() {
        return Ok(());
    }
    output.device().synchronize()?;
    let now = Instant::now();
    match lock().as_mut() {
        Some(recording) => recording.charge(name, now),
        None => Ok(()),
    }
}

/// Runs `f` with marks recorded, and returns its result with the parts' times in the order their
/// first marks came, then [`REST`]: the time from the last mark until `f` returned and `device`
/// (the device `f` computes on) was idle. `device` is synchronised before the clock starts.
pub fn record_parts<T>(device: &Device, f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<PartTime>)> {
    device.synchronize()?;
    {
        let mut state = lock();
        if state.is_some() {
            candle_core::bail!("probe: a part recording is already running in this process");
        }
        let last_bytes = bytes_in_use(device)?;
        reset_part_peak(device)?;
        *state = Some(Recording {
            device: device.clone(),
            last: Instant::now(),
            last_bytes,
            last_written: buffers_written(device),
            parts: Vec::new(),
        });
        RECORDING.store(true, Ordering::Relaxed);
    }
    // Ends the recording however `f` leaves (result, error or panic).
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            RECORDING.store(false, Ordering::Relaxed);
            lock().take();
        }
    }
    let stop = Stop;
    let out = with_recording_on_this_thread(true, f)?;
    device.synchronize()?;
    let now = Instant::now();
    let mut recording = lock().take().expect("the recording this call started");
    recording.charge(REST, now)?;
    drop(stop);
    Ok((out, recording.parts))
}

/// Whether this thread's marks are charged to a running recording (to carry over to a thread
/// that runs part of its work: [`with_recording_on_this_thread`]).
pub fn recording_on_this_thread() -> bool {
    THREAD_RECORDS.with(Cell::get)
}

/// Runs `f` with this thread's marks charged to the running recording iff `records`, then
/// restores the thread's previous setting.
pub fn with_recording_on_this_thread<R>(records: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_RECORDS.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(THREAD_RECORDS.with(|c| c.replace(records)));
    f()
}

/// The state, also after a panic elsewhere (its data stays consistent: every update is one call).
fn lock() -> std::sync::MutexGuard<'static, Option<Recording>> {
    STATE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    // One test owns the process-wide recording, so the checks run in sequence.
    #[test]
    fn parts_add_up_by_name_in_first_mark_order_and_a_second_recording_is_refused() {
        let dev = Device::Cpu;
        let x = Tensor::ones(4, DType::F32, &dev).unwrap();
        // Outside a recording a mark does nothing.
        mark("outside", &x).unwrap();

        let (value, parts) = record_parts(&dev, || {
            for _ in 0..3 {
                mark("layer", &x)?;
                std::thread::sleep(std::time::Duration::from_millis(2));
                mark("pause", &x)?;
            }
            // Another thread's marks are not charged; a thread handed the recording's work is.
            let (x, carried) = (&x, recording_on_this_thread());
            std::thread::scope(|scope| {
                scope.spawn(|| mark("other-thread", x).unwrap());
                scope.spawn(move || with_recording_on_this_thread(carried, || mark("handed-over", x).unwrap()));
            });
            // Nested recordings are refused, and the refusal leaves this one running.
            let nested = record_parts(&dev, || Ok(())).unwrap_err().to_string();
            assert!(nested.contains("already running"), "{nested}");
            mark("after-nested", x)?;
            Ok(7)
        })
        .unwrap();
        assert_eq!(value, 7);
        let summary: Vec<(&str, usize)> = parts.iter().map(|p| (p.name.as_str(), p.count)).collect();
        assert_eq!(summary, [("layer", 3), ("pause", 3), ("handed-over", 1), ("after-nested", 1), (REST, 1)]);
        let pause = &parts[1];
        assert!(pause.seconds >= 0.006, "three 2 ms sleeps were charged {} s", pause.seconds);
        assert!(parts.iter().all(|p| p.seconds >= 0.0));

        // An error inside ends the recording: the next one starts cleanly.
        let err = record_parts(&dev, || -> Result<()> { candle_core::bail!("inner failure") }).unwrap_err();
        assert!(err.to_string().contains("inner failure"));
        let (_, parts) = record_parts(&dev, || mark("only", &x)).unwrap();
        assert_eq!(parts.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["only", REST]);
    }
}
