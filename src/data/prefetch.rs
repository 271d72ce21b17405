//! Decoding batches ahead of the training step, on a thread of their own.
//!
//! A training step on a GPU waits for nothing on the host but its inputs; if the next batch is
//! decoded from Parquet and collated only when the step asks for it, the GPU idles for that long
//! every step. [`Prefetch`] runs the batch stream on a background thread that keeps up to `depth`
//! finished batches in a bounded channel, so decoding overlaps the step. The order of the items
//! is the stream's, so training stays bit-reproducible.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

/// An iterator that pulls `inner` on a background thread, up to `depth` items ahead.
pub struct Prefetch<T> {
    receiver: Option<Receiver<T>>,
    worker: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Prefetch<T> {
    /// Starts pulling `inner` (`depth ≥ 1` items are buffered; the worker blocks when they are).
    pub fn new<I>(inner: I, depth: usize) -> Self
    where
        I: Iterator<Item = T> + Send + 'static,
    {
        let (sender, receiver) = sync_channel(depth.max(1));
        let worker = std::thread::Builder::new()
            .name("rankstack-prefetch".into())
            .spawn(move || {
                for item in inner {
                    // The consumer went away: stop decoding.
                    if sender.send(item).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the prefetch thread");
        Self { receiver: Some(receiver), worker: Some(worker) }
    }
}

impl<T> Iterator for Prefetch<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        self.receiver.as_ref()?.recv().ok()
    }
}

impl<T> Drop for Prefetch<T> {
    fn drop(&mut self) {
        // Closing the channel first makes a blocked `send` fail, so the join cannot hang; the
        // worker finishes at most the item it is decoding.
        drop(self.receiver.take());
        if let Some(worker) = self.worker.take() {
            // A panic in the worker already ended the stream early; it is not raised twice.
            let _ = worker.join();
        }
    }
}

impl<T> std::fmt::Debug for Prefetch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetch").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn yields_every_item_in_order() {
        let got: Vec<u32> = Prefetch::new(0..1000u32, 3).collect();
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn stays_at_most_depth_plus_one_ahead_and_stops_when_dropped() {
        let pulled = Arc::new(AtomicUsize::new(0));
        let counter = pulled.clone();
        let endless = (0u64..).inspect(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let mut p = Prefetch::new(endless, 2);
        assert_eq!(p.next(), Some(0));
        std::thread::sleep(std::time::Duration::from_millis(50));
        // One taken, two buffered, one held by the blocked sender.
        assert!(pulled.load(Ordering::SeqCst) <= 4, "{}", pulled.load(Ordering::SeqCst));
        drop(p); // must not hang on the endless stream
        let after = pulled.load(Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(pulled.load(Ordering::SeqCst), after, "the worker stopped");
    }
}
