//! The dynamic batcher, as Triton's: requests wait in a bounded queue; one scoring thread takes
//! the oldest, keeps taking queued requests until the batch holds `max_batch` candidates or the
//! oldest has waited `max_queue_delay`, scores the batch once, and splits the probabilities back
//! to the requests.
//!
//! - A full queue refuses the request at once ([`Batcher::submit`] → [`Overloaded`]; HTTP 503).
//! - A request whose deadline (`parameters.timeout`) passes while it waits in the queue is
//!   answered [`Outcome::TimedOut`] and not scored; a batch's window closes at the earliest
//!   deadline among its requests, so waiting for company never makes a request late.
//! - A batch only merges requests checked against the same model ([`ServedModel`]), so a reload
//!   never mixes models in one batch and each request is scored by the model that checked it.
//! - If scoring a merged batch fails, each of its requests is scored alone, so only a request that
//!   fails by itself gets an error; a panic in the model is caught and reported the same way.
//! - Dropping the last [`Batcher`] handle closes the queue; the thread scores what is queued and
//!   ends (the graceful shutdown's drain).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::DType;
use rankstack_nn::host_transfer::read_computed;
use tokio::sync::oneshot;

use super::metrics::Metrics;
use super::model::ServedModel;
use crate::data::{collate, Example};

/// Batching limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Most candidates scored in one batch (a request is never split).
    pub max_batch: usize,
    /// Longest time the oldest queued request waits for others to join its batch.
    pub max_queue_delay: Duration,
    /// Most requests waiting; more are refused.
    pub max_queue: usize,
}

impl BatcherConfig {
    /// Checks the limits: all positive except the delay.
    pub fn validate(&self) -> rankstack_nn::Result<()> {
        if self.max_batch == 0 {
            return Err(rankstack_nn::Error::config("serve", "max-batch", "must be > 0"));
        }
        if self.max_queue == 0 {
            return Err(rankstack_nn::Error::config("serve", "max-queue", "must be > 0"));
        }
        Ok(())
    }
}

/// One request's rows on their way to the scoring thread.
pub struct Job {
    /// The model the rows were checked against (and will be scored by).
    pub model: Arc<ServedModel>,
    /// The candidates.
    pub rows: Vec<Example>,
    /// When the request must have left the queue.
    pub deadline: Option<Instant>,
    /// When it was queued.
    pub queued_at: Instant,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Outcome>,
}

/// What happened to a job.
#[derive(Debug)]
pub enum Outcome {
    /// `probabilities[task][candidate]`, by `model`, in a batch of `batch_rows` candidates.
    Scored {
        /// One vector per task.
        probabilities: Vec<Vec<f32>>,
        /// The model that scored it.
        model: Arc<ServedModel>,
        /// Time spent queued.
        queue_time: Duration,
    },
    /// The deadline passed in the queue.
    TimedOut {
        /// Time spent queued.
        queue_time: Duration,
    },
    /// The model could not score these rows (on their own).
    Failed(String),
}

/// The queue is full: answer 503.
#[derive(Debug)]
pub struct Overloaded;

/// The handle requests are submitted through.
pub struct Batcher {
    queue: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
}

impl Batcher {
    /// Starts the scoring thread. The returned handle joins it once every [`Batcher`] is dropped
    /// and the queue is drained.
    pub fn start(config: BatcherConfig, metrics: Arc<Metrics>) -> rankstack_nn::Result<(Self, JoinHandle<()>)> {
        config.validate()?;
        let (queue, jobs) = mpsc::sync_channel(config.max_queue);
        let depth = Arc::new(AtomicUsize::new(0));
        let thread_depth = depth.clone();
        let handle = std::thread::Builder::new()
            .name("rankstack-batcher".into())
            .spawn(move || run(config, jobs, thread_depth, metrics))
            .map_err(|e| rankstack_nn::Error::config("serve", "batcher", format!("cannot start its thread: {e}")))?;
        Ok((Self { queue, depth }, handle))
    }

    /// Queues a job, or refuses it when `max_queue` jobs wait.
    pub fn submit(&self, job: Job) -> Result<(), Overloaded> {
        self.depth.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                Err(Overloaded)
            }
        }
    }

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }
}

/// The scoring thread's loop.
fn run(config: BatcherConfig, jobs: mpsc::Receiver<Job>, depth: Arc<AtomicUsize>, metrics: Arc<Metrics>) {
    // A job taken from the queue after its deadline timed out there: answered, not batched.
    let take = |job: Job| -> Option<Job> {
        depth.fetch_sub(1, Ordering::SeqCst);
        unexpired(job)
    };
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(job) => unexpired(job),
            None => match jobs.recv() {
                Ok(job) => take(job),
                Err(_) => return, // closed and drained
            },
        };
        let Some(first) = first else { continue };
        // The window closes at the delay, or earlier at the first deadline in the batch: waiting
        // for company never makes a request miss its deadline.
        let mut window_end = first.queued_at + config.max_queue_delay;
        let mut rows = first.rows.len();
        let mut batch = vec![first];
        while rows < config.max_batch {
            if let Some(d) = batch.last().and_then(|j| j.deadline) {
                window_end = window_end.min(d);
            }
            let now = Instant::now();
            // Past the window, still take whatever is already queued (a full queue fills batches).
            let next = if now >= window_end {
                jobs.try_recv().map_err(|_| RecvTimeoutError::Timeout)
            } else {
                jobs.recv_timeout(window_end - now)
            };
            let Ok(job) = next else { break };
            let Some(job) = take(job) else { continue };
            if Arc::ptr_eq(&job.model, &batch[0].model) && rows + job.rows.len() <= config.max_batch {
                rows += job.rows.len();
                batch.push(job);
            } else {
                held = Some(job);
                break;
            }
        }
        score(batch, &metrics);
    }
}

/// The job, or `None` after answering it [`Outcome::TimedOut`] if its deadline has passed.
fn unexpired(job: Job) -> Option<Job> {
    let now = Instant::now();
    match job.deadline {
        Some(d) if now > d => {
            let _ = job.reply.send(Outcome::TimedOut { queue_time: now - job.queued_at });
            None
        }
        _ => Some(job),
    }
}

/// Scores a batch once (each request alone if that fails) and answers every job.
fn score(live: Vec<Job>, metrics: &Metrics) {
    let now = Instant::now();
    for job in &live {
        metrics.queue_time.observe((now - job.queued_at).as_secs_f64());
    }
    let model = live[0].model.clone();
    let all: Vec<&Example> = live.iter().flat_map(|j| &j.rows).collect();
    let started = Instant::now();
    let result = predict(&model, &all);
    metrics.scoring_time.observe(started.elapsed().as_secs_f64());
    metrics.batch_candidates.observe(all.len() as f64);
    metrics.batch_requests.observe(live.len() as f64);
    match result {
        Ok(probabilities) => {
            let mut start = 0;
            for job in live {
                let n = job.rows.len();
                let mine = probabilities.iter().map(|task| task[start..start + n].to_vec()).collect();
                start += n;
                let _ = job.reply.send(Outcome::Scored {
                    probabilities: mine,
                    model: model.clone(),
                    queue_time: now - job.queued_at,
                });
            }
        }
        Err(_) if live.len() > 1 => {
            // Find the culprit: each request alone.
            for job in live {
                let rows: Vec<&Example> = job.rows.iter().collect();
                let outcome = match predict(&model, &rows) {
                    Ok(probabilities) => {
                        Outcome::Scored { probabilities, model: model.clone(), queue_time: now - job.queued_at }
                    }
                    Err(e) => Outcome::Failed(e),
                };
                let _ = job.reply.send(outcome);
            }
        }
        Err(e) => {
            for job in live {
                let _ = job.reply.send(Outcome::Failed(e.clone()));
            }
        }
    }
}

/// Scores rows with `model`: `[task][row]` probabilities, or the model's error (a panic included).
fn predict(model: &ServedModel, rows: &[&Example]) -> Result<Vec<Vec<f32>>, String> {
    let run = || -> rankstack_nn::Result<Vec<Vec<f32>>> {
        let owned: Vec<Example> = rows.iter().map(|r| (*r).clone()).collect();
        let index: Vec<u64> = (0..owned.len() as u64).collect();
        let batch = collate(&model.schema, &owned, &index)?.into_device(&model.device)?;
        // Task-major: one row of probabilities per task.
        let p = model.ranker.predict(&batch.batch)?.to_dtype(DType::F32)?.t()?;
        let (tasks, rows) = p.dims2()?;
        let p = read_computed::<f32>(&p, "probabilities")?;
        Ok((0..tasks).map(|t| p[t * rows..(t + 1) * rows].to_vec()).collect())
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!(
            "the model panicked: {}",
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default()
        )),
    }
}
