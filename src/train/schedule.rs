//! Learning-rate schedule: linear warm-up, then cosine decay.

/// `lr(t) = peak · t / warmup` for `t < warmup`, then
/// `peak · (min_ratio + (1 − min_ratio) · ½(1 + cos(π · (t − warmup) / (total − warmup))))`,
/// held at `peak · min_ratio` after `total` (steps count from 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupCosine {
    /// Peak learning rate.
    pub peak: f64,
    /// Warm-up steps.
    pub warmup: u64,
    /// Total steps (end of the decay).
    pub total: u64,
    /// Final learning rate as a fraction of the peak.
    pub min_ratio: f64,
}

impl WarmupCosine {
    /// The learning rate for (0-based) step `t`.
    pub fn lr(&self, t: u64) -> f64 {
        if t < self.warmup {
            return self.peak * (t + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((t - self.warmup) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_by_hand() {
        let s = WarmupCosine { peak: 1.0, warmup: 4, total: 14, min_ratio: 0.1 };
        assert_eq!([s.lr(0), s.lr(1), s.lr(3)], [0.25, 0.5, 1.0]);
        assert!((s.lr(4) - 1.0).abs() < 1e-15); // start of the decay
        assert!((s.lr(9) - 0.55).abs() < 1e-12); // halfway: 0.1 + 0.9 · 0.5
        assert!((s.lr(14) - 0.1).abs() < 1e-15 && (s.lr(100) - 0.1).abs() < 1e-15);
    }
}
