//! Which sequence positions attention may look at.

use std::sync::Mutex;

use rankstack_nn::rng::Rng;

use crate::{FutureMask, TimeWindowSampling, DAY_MS};

/// The key mask of a batch (`true` = masked), row-major `[B, S]`, for `action_types`, `timestamps`
/// (both `[B, S]`, row-major, newest first) and `request_time` `[B]`, all in milliseconds.
///
/// Position `j` of example `b` is masked when any of these holds:
/// - it is padding: `action_types[b, j] == 0`;
/// - it is not in the past: `timestamps[b, j] ≥ request_time[b]`;
/// - `window` is given (training) and the action is inside the random recent window:
///   `request_time[b] − timestamps[b, j] < window[b]`.
///
/// Position 0 (the newest) is never masked, so every row keeps at least one key and the softmax
/// and the max-pool are always defined.
///
/// ```
/// // Two actions, newest first, at t = 90 and t = 50, request at t = 100; a 20 ms window masks the
/// // first, but position 0 is never masked.
/// let m = sequence_transformer::key_mask(&[3, 5], &[90, 50], &[100], 2, Some(&[20.0]));
/// assert_eq!(m, vec![false, false]);
/// let m = sequence_transformer::key_mask(&[3, 5, 0], &[90, 50, 0], &[100], 3, Some(&[60.0]));
/// assert_eq!(m, vec![false, true, true]);
/// ```
pub fn key_mask(
    action_types: &[i64],
    timestamps: &[i64],
    request_time: &[i64],
    seq_len: usize,
    window: Option<&[f64]>,
) -> Vec<bool> {
    key_mask_with(action_types, timestamps, request_time, seq_len, window, FutureMask::AtOrAfter)
}

/// [`key_mask`] with a choice of future mask: [`FutureMask::After`] masks `timestamps[b, j] >
/// request_time[b]` only, so an action at exactly the request time stays visible (outside a
/// training window).
///
/// ```
/// use sequence_transformer::{key_mask_with, FutureMask};
/// // The second action carries exactly the request time.
/// let m = key_mask_with(&[3, 5], &[90, 100], &[100], 2, None, FutureMask::AtOrAfter);
/// assert_eq!(m, vec![false, true]);
/// let m = key_mask_with(&[3, 5], &[90, 100], &[100], 2, None, FutureMask::After);
/// assert_eq!(m, vec![false, false]);
/// ```
pub fn key_mask_with(
    action_types: &[i64],
    timestamps: &[i64],
    request_time: &[i64],
    seq_len: usize,
    window: Option<&[f64]>,
    future: FutureMask,
) -> Vec<bool> {
    let mut mask = Vec::with_capacity(action_types.len());
    for (b, &req) in request_time.iter().enumerate() {
        for j in 0..seq_len {
            let i = b * seq_len + j;
            let t = timestamps[i];
            let in_window = window.is_some_and(|w| ((req - t) as f64) < w[b]);
            let not_past = match future {
                FutureMask::AtOrAfter => t >= req,
                FutureMask::After => t > req,
            };
            mask.push(j > 0 && (action_types[i] == 0 || not_past || in_window));
        }
    }
    mask
}

/// Draws the training time windows `T_b ~ U[0, max_ms]`, one per example (or, with
/// [`TimeWindowSampling::PerBatchDays`], one whole number of days per batch), from its own seeded
/// [`Rng`], so training is reproducible; the state can be saved and restored.
///
/// ```
/// # use sequence_transformer::TimeWindowSampler;
/// let sampler = TimeWindowSampler::new(3_600_000.0, 42);
/// let state = sampler.rng_state();
/// let a = sampler.sample(4);
/// sampler.set_rng_state(state);
/// assert_eq!(a, sampler.sample(4));
/// assert!(a.iter().all(|&t| (0.0..=3_600_000.0).contains(&t)));
/// ```
#[derive(Debug)]
pub struct TimeWindowSampler {
    max_ms: f64,
    sampling: TimeWindowSampling,
    rng: Mutex<Rng>,
}

impl TimeWindowSampler {
    /// A sampler of windows up to `max_ms`, one per example, seeded by `seed`.
    pub fn new(max_ms: f64, seed: u64) -> Self {
        Self::with_sampling(max_ms, TimeWindowSampling::PerExample, seed)
    }

    /// A sampler of windows up to `max_ms` drawn as `sampling` says, seeded by `seed`.
    ///
    /// ```
    /// # use sequence_transformer::{TimeWindowSampler, TimeWindowSampling, DAY_MS};
    /// let sampler = TimeWindowSampler::with_sampling(3.0 * DAY_MS, TimeWindowSampling::PerBatchDays, 7);
    /// let w = sampler.sample(5);
    /// assert!(w.iter().all(|&t| t == w[0]) && [0.0, 1.0, 2.0, 3.0].contains(&(w[0] / DAY_MS)));
    /// ```
    pub fn with_sampling(max_ms: f64, sampling: TimeWindowSampling, seed: u64) -> Self {
        Self { max_ms, sampling, rng: Mutex::new(Rng::new(seed)) }
    }

    /// The upper bound.
    pub fn max_ms(&self) -> f64 {
        self.max_ms
    }

    /// `batch` windows in milliseconds.
    pub fn sample(&self, batch: usize) -> Vec<f64> {
        let mut rng = self.rng.lock().expect("time-window rng lock poisoned");
        match self.sampling {
            TimeWindowSampling::PerExample => (0..batch).map(|_| rng.uniform() * self.max_ms).collect(),
            TimeWindowSampling::PerBatchDays => {
                // n uniform on {0, …, max_days}: ⌊u · (max_days + 1)⌋, u ∈ [0, 1).
                let max_days = (self.max_ms / DAY_MS).floor();
                let days = (rng.uniform() * (max_days + 1.0)).floor().min(max_days);
                vec![days * DAY_MS; batch]
            }
        }
    }

    /// The generator state.
    pub fn rng_state(&self) -> [u64; 4] {
        self.rng.lock().expect("time-window rng lock poisoned").state()
    }

    /// Restores a state from [`TimeWindowSampler::rng_state`].
    pub fn set_rng_state(&self, state: [u64; 4]) {
        *self.rng.lock().expect("time-window rng lock poisoned") = Rng::from_state(state);
    }
}
