//! Evaluation metrics for binary tasks: AUC, log loss, normalised entropy, calibration.

use serde::Serialize;

/// Metrics of one task on one evaluation set. Examples with a missing (NaN) label are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TaskMetrics {
    /// Labelled examples.
    pub count: usize,
    /// Area under the ROC curve (exact, ties counted as one half); NaN with a single class.
    pub auc: f64,
    /// Mean binary cross-entropy of the probabilities (clamped to `[1e-7, 1 − 1e-7]`).
    pub log_loss: f64,
    /// Normalised entropy: log loss divided by the entropy of the base rate (lower is better; 1 is
    /// no better than predicting the base rate).
    pub normalized_entropy: f64,
    /// Mean prediction / mean label (1 is perfectly calibrated on average).
    pub calibration: f64,
}

/// Exact AUC with ties: the Mann–Whitney statistic with average ranks,
/// `(Σ ranks of positives − P(P+1)/2) / (P·N)`, for labels in `[0, 1]` (soft labels count as
/// weights: a label `y` contributes `y` positives and `1 − y` negatives). NaN labels are skipped.
///
/// Total over any input: a NaN score among the labelled examples gives NaN (no ranking exists);
/// infinite scores rank as the extremes.
pub fn auc(scores: &[f64], labels: &[f64]) -> f64 {
    let mut pairs: Vec<(f64, f64)> =
        scores.iter().zip(labels).filter(|(_, y)| !y.is_nan()).map(|(s, y)| (*s, *y)).collect();
    if pairs.iter().any(|(s, _)| s.is_nan()) {
        return f64::NAN;
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut pos, mut neg) = (0.0, 0.0);
    let mut rank_sum = 0.0; // Σ over positives of the weighted count of negatives ranked below (+½ ties)
    let mut neg_below = 0.0;
    let mut i = 0;
    while i < pairs.len() {
        let mut j = i;
        let (mut p_tie, mut n_tie) = (0.0, 0.0);
        // `total_cmp`, not `==`: the group always holds `pairs[i]` itself, so the loop advances
        // whatever the values are.
        while j < pairs.len() && pairs[j].0.total_cmp(&pairs[i].0).is_eq() {
            p_tie += pairs[j].1;
            n_tie += 1.0 - pairs[j].1;
            j += 1;
        }
        rank_sum += p_tie * (neg_below + 0.5 * n_tie);
        neg_below += n_tie;
        pos += p_tie;
        neg += n_tie;
        i = j;
    }
    if pos == 0.0 || neg == 0.0 {
        f64::NAN
    } else {
        rank_sum / (pos * neg)
    }
}

/// All metrics of one task from probabilities and labels. Total over any input: non-finite
/// probabilities give NaN metrics (never a hang or a panic).
pub fn task_metrics(probabilities: &[f64], labels: &[f64]) -> TaskMetrics {
    let (mut n, mut ll, mut sum_p, mut sum_y) = (0usize, 0.0, 0.0, 0.0);
    for (&p, &y) in probabilities.iter().zip(labels) {
        if y.is_nan() {
            continue;
        }
        let q = p.clamp(1e-7, 1.0 - 1e-7);
        ll -= y * q.ln() + (1.0 - y) * (1.0 - q).ln();
        sum_p += p;
        sum_y += y;
        n += 1;
    }
    let nf = n.max(1) as f64;
    let log_loss = ll / nf;
    let base = (sum_y / nf).clamp(1e-7, 1.0 - 1e-7);
    let entropy = -(base * base.ln() + (1.0 - base) * (1.0 - base).ln());
    TaskMetrics {
        count: n,
        auc: auc(probabilities, labels),
        log_loss,
        normalized_entropy: log_loss / entropy,
        calibration: if sum_y > 0.0 { sum_p / sum_y } else { f64::NAN },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_by_hand_with_ties() {
        assert_eq!(auc(&[0.1, 0.4, 0.35, 0.8], &[0.0, 0.0, 1.0, 1.0]), 0.75);
        assert_eq!(auc(&[0.1, 0.2, 0.3], &[0.0, 1.0, 1.0]), 1.0);
        assert_eq!(auc(&[0.5, 0.5, 0.5, 0.5], &[0.0, 1.0, 0.0, 1.0]), 0.5); // all tied
                                                                            // One positive tied with one of two negatives, above the other: (1 + ½) / 2.
        assert_eq!(auc(&[0.2, 0.7, 0.7], &[0.0, 0.0, 1.0]), 0.75);
        assert!(auc(&[0.1, 0.2], &[1.0, 1.0]).is_nan());
        assert_eq!(auc(&[0.1, 0.9, 0.5], &[0.0, 1.0, f64::NAN]), 1.0);
    }

    #[test]
    fn auc_matches_brute_force_pair_counting() {
        let mut rng = rankstack_nn::rng::Rng::new(3);
        let scores: Vec<f64> = (0..300).map(|_| (rng.uniform() * 20.0).floor()).collect(); // many ties
        let labels: Vec<f64> = (0..300).map(|_| if rng.uniform() < 0.3 { 1.0 } else { 0.0 }).collect();
        let (mut wins, mut pairs) = (0.0, 0.0);
        for i in 0..300 {
            for j in 0..300 {
                if labels[i] == 1.0 && labels[j] == 0.0 {
                    pairs += 1.0;
                    wins += if scores[i] > scores[j] {
                        1.0
                    } else if scores[i] == scores[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        assert!((auc(&scores, &labels) - wins / pairs).abs() < 1e-12);
    }

    #[test]
    fn metrics_are_total_over_non_finite_scores() {
        // Used to loop forever: NaN == NaN is false, so the tie group never advanced.
        assert!(auc(&[0.2, f64::NAN, 0.7], &[0.0, 1.0, 1.0]).is_nan());
        assert!(auc(&[f64::NAN; 3], &[0.0, 1.0, 0.0]).is_nan());
        assert_eq!(auc(&[f64::NEG_INFINITY, f64::INFINITY, f64::INFINITY], &[0.0, 1.0, 0.0]), 0.75);
        assert_eq!(auc(&[0.3, f64::NAN, 0.1], &[1.0, f64::NAN, 0.0]), 1.0); // unlabelled: skipped
        let m = task_metrics(&[0.5, f64::NAN, 0.1], &[1.0, 0.0, 0.0]);
        assert!(m.auc.is_nan() && m.log_loss.is_nan() && m.calibration.is_nan() && m.normalized_entropy.is_nan());
    }

    #[test]
    fn log_loss_entropy_and_calibration_by_hand() {
        // Predicting the base rate 0.25 for 1 positive and 3 negatives: NE = 1, calibration 1.
        let m = task_metrics(&[0.25; 4], &[1.0, 0.0, 0.0, 0.0]);
        assert!((m.normalized_entropy - 1.0).abs() < 1e-12 && (m.calibration - 1.0).abs() < 1e-12);
        assert!((m.log_loss - -(0.25f64.ln() + 3.0 * 0.75f64.ln()) / 4.0).abs() < 1e-12);
        assert_eq!(m.count, 4);
    }
}
