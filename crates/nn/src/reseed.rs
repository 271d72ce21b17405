//! Per-step reseeding of training-time randomness.

/// A module that draws random numbers in training (dropout masks, random masking windows).
///
/// A trainer calls `reseed(f(seed, step))` before every step, so each step's randomness is a pure
/// function of the run's seed and the step number: runs are reproducible, and a run resumed from a
/// checkpoint at step `k` draws exactly what the uninterrupted run drew, with no RNG state to save.
/// Containers pass distinct derived seeds ([`child_seed`]) to their children.
pub trait Reseed {
    /// Resets every random stream of the module (and its children) from `seed`.
    fn reseed(&self, seed: u64);
}

/// A seed for the child `name` of a module reseeded with `seed`.
pub fn child_seed(seed: u64, name: &str) -> u64 {
    let mut s = seed ^ crate::rng::hash_name(name);
    crate::rng::splitmix64(&mut s)
}

impl Reseed for crate::Dropout {
    fn reseed(&self, seed: u64) {
        self.set_rng_state(crate::rng::Rng::new(seed).state());
    }
}

impl Reseed for crate::Mlp {
    fn reseed(&self, seed: u64) {
        self.dropout().reseed(seed);
    }
}
