//! [`UploadAhead`]: the next batch copied to the device while the current step runs.
//!
//! The data pipeline decodes and collates batches on a thread of its own ([`super::Prefetch`]);
//! the copy of a batch's inputs to a GPU ([`LabeledBatch::into_device`]) happens here, on a
//! second helper thread, one batch ahead of the consumer. While step `k` runs on batch `k`,
//! batch `k + 1` is copied; the consumer then finds it on the device.
//!
//! Why this is safe on CUDA: candle's CUDA device issues its work on the CUDA *per-thread* default
//! stream, so the helper's copies do not queue behind the consumer's kernels (that is the
//! overlap), and nothing orders them before those kernels either. The helper therefore waits for
//! its own stream (`Device::synchronize`, which on a per-thread stream waits for that thread's
//! work only) before it hands the batch over: every copy is complete when the consumer first uses
//! the batch. On a device with a single shared stream the same code is correct too (the copy is
//! queued before any kernel that reads it), only without the overlap.
//!
//! On the CPU there is nothing to copy: the batch is placed on the device (a no-op) on the
//! consumer's thread, and no helper thread starts. The helper's transfers
//! ([`rankstack_nn::host_transfer`]) are added to the consumer's recording when it takes the batch,
//! so a test counts them as the consumer's; a batch copied ahead but never taken (the run stopped
//! before it) is in no recording.
//!
//! The device then holds two batches of inputs at a time, the one in use and the next; the cost
//! planner counts the second (`ranker_model::TrainingCalibration::inputs_ahead`).

use std::sync::mpsc::{sync_channel, SyncSender};

use candle_core::Device;
use rankstack_nn::host_transfer::{record_as_mine, record_transfers, Transfer};
use rankstack_nn::{Error, Result};

use super::{LabeledBatch, Prefetch};

/// Batches of `inner` on `device`, each copied on a helper thread while the previous one is used
/// (see the module documentation). Items come in `inner`'s order, errors included; dropping it
/// stops the helper.
pub struct UploadAhead<I> {
    inner: I,
    device: Device,
    /// The helper, on a device other than the CPU (or when forced, for tests).
    helper: Option<Helper>,
    /// The next item: a batch being copied, or an error of `inner` to pass on in its turn.
    next: Option<Pending>,
}

enum Pending {
    Copying,
    Failed(Error),
}

/// The helper: a [`Prefetch`] thread that copies the batches sent to it, in order. Dropping it
/// drops `jobs` first (the fields' order), which ends the thread's loop wherever it waits.
struct Helper {
    jobs: SyncSender<LabeledBatch>,
    copied: Prefetch<(Result<LabeledBatch>, Vec<Transfer>)>,
}

impl<I: Iterator<Item = Result<LabeledBatch>>> UploadAhead<I> {
    /// `inner`'s batches on `device`: copied ahead on a helper thread unless `device` is the CPU.
    pub fn new(inner: I, device: &Device) -> Self {
        Self::with_helper(inner, device, !device.is_cpu())
    }

    /// [`UploadAhead::new`], with the helper thread also on the CPU when `helper` (tests).
    pub(crate) fn with_helper(mut inner: I, device: &Device, helper: bool) -> Self {
        let mut helper = helper.then(|| Helper::start(device.clone()));
        // The first batch starts copying at once.
        let next = helper.as_mut().and_then(|h| h.submit(inner.next()));
        Self { inner, device: device.clone(), helper, next }
    }
}

impl<I: Iterator<Item = Result<LabeledBatch>>> Iterator for UploadAhead<I> {
    type Item = Result<LabeledBatch>;

    fn next(&mut self) -> Option<Result<LabeledBatch>> {
        let Some(helper) = self.helper.as_mut() else {
            return self.inner.next().map(|item| item?.into_device(&self.device));
        };
        let current = match self.next.take()? {
            Pending::Failed(e) => Err(e),
            Pending::Copying => helper.receive(),
        };
        // The next batch's copy starts before this one is handed out.
        self.next = helper.submit(self.inner.next());
        Some(current)
    }
}

impl Helper {
    fn start(device: Device) -> Self {
        let (jobs, job_queue) = sync_channel::<LabeledBatch>(1);
        let copies = job_queue.into_iter().map(move |batch| {
            record_transfers(|| -> Result<LabeledBatch> {
                let batch = batch.into_device(&device)?;
                // Every copy done before the consumer's stream may read the batch (see the
                // module documentation).
                device.synchronize()?;
                Ok(batch)
            })
        });
        Self { jobs, copied: Prefetch::new(copies, 1) }
    }

    /// Hands `item` (a batch) to the helper; an error or the end of the data stays here.
    fn submit(&mut self, item: Option<Result<LabeledBatch>>) -> Option<Pending> {
        Some(match item? {
            Err(e) => Pending::Failed(e),
            Ok(batch) => match self.jobs.send(batch) {
                Ok(()) => Pending::Copying,
                Err(_) => Pending::Failed(helper_stopped()),
            },
        })
    }

    /// The batch the helper copied last, its transfers added to this thread's recording.
    fn receive(&mut self) -> Result<LabeledBatch> {
        match self.copied.next() {
            Some((batch, transfers)) => {
                record_as_mine(transfers);
                batch
            }
            None => Err(helper_stopped()),
        }
    }
}

fn helper_stopped() -> Error {
    Error::Candle(candle_core::Error::Msg("the thread copying batches to the device stopped (it panicked)".to_string()))
}

impl<I> std::fmt::Debug for UploadAhead<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadAhead").field("device", &self.device).field("helper", &self.helper.is_some()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rankstack_nn::host_transfer::Direction;

    /// `n` batches of two synthetic rows (batch `i` holds rows `2i` and `2i + 1`), with an error
    /// instead of batch `fail`.
    fn batches(n: usize, fail: Option<usize>) -> impl Iterator<Item = Result<LabeledBatch>> {
        let spec = crate::data::synthetic::SyntheticSpec { rows: 2 * n.max(1), ..Default::default() };
        let schema = spec.schema();
        let (rows, _) = crate::data::synthetic::examples(&spec).unwrap();
        (0..n).map(move |i| {
            if Some(i) == fail {
                return Err(Error::input("test data", "row group", format!("row group {i} is corrupt")));
            }
            let index = [2 * i as u64, 2 * i as u64 + 1];
            crate::data::collate(&schema, &rows[2 * i..2 * i + 2], &index)
        })
    }

    fn first_rows(items: Vec<Result<LabeledBatch>>) -> Vec<std::result::Result<u64, String>> {
        items.into_iter().map(|b| b.map(|b| b.row_index[0]).map_err(|e| e.to_string())).collect()
    }

    #[test]
    fn batches_come_in_order_with_errors_in_their_turn_with_and_without_the_helper() {
        for helper in [false, true] {
            let got: Vec<_> = UploadAhead::with_helper(batches(5, Some(3)), &Device::Cpu, helper).collect();
            let got = first_rows(got);
            assert_eq!(got[..3], [Ok(0), Ok(2), Ok(4)], "helper {helper}");
            assert!(got[3].as_ref().unwrap_err().contains("row group 3 is corrupt"), "{got:?}");
            assert_eq!(got[4], Ok(8));
            assert_eq!(got.len(), 5);
        }
        assert_eq!(UploadAhead::with_helper(batches(0, None), &Device::Cpu, true).count(), 0);
    }

    #[test]
    fn the_helpers_copies_are_recorded_as_the_consumers() {
        for helper in [false, true] {
            let (taken, transfers) = record_transfers(|| {
                let mut ahead = UploadAhead::with_helper(batches(4, None), &Device::Cpu, helper);
                // Two of four batches taken; the helper may have copied a third already, which is
                // not the consumer's until taken.
                (ahead.next().unwrap().unwrap(), ahead.next().unwrap().unwrap())
            });
            assert_eq!((taken.0.row_index[0], taken.1.row_index[0]), (0, 2));
            let copies: Vec<_> = transfers.iter().filter(|t| t.direction == Direction::ToDevice).collect();
            assert!(!copies.is_empty() && copies.iter().all(|t| t.what == "batch input"), "{copies:?}");
            let per_batch = copies.len() / 2;
            assert_eq!(copies.len(), 2 * per_batch, "helper {helper}: {copies:?}");
        }
    }

    #[test]
    fn dropping_it_early_stops_the_helper() {
        let mut ahead = UploadAhead::with_helper(batches(1000, None), &Device::Cpu, true);
        assert!(ahead.next().unwrap().is_ok());
        drop(ahead); // must not hang: the helper may be blocked handing over a batch
    }
}
