//! Prometheus metrics in the text exposition format (version 0.0.4), written by hand: a few
//! counters and histograms need no client library.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `rankstack_infer_requests_total{code}` | counter | inference requests by HTTP status |
//! | `rankstack_http_requests_total{code}` | counter | all HTTP requests by status |
//! | `rankstack_infer_candidates_total` | counter | candidates scored |
//! | `rankstack_request_latency_seconds` | histogram | inference request latency (receipt → response) |
//! | `rankstack_request_latency_recent_seconds{quantile}` | summary | p50/p99/p999 over the last 4096 requests |
//! | `rankstack_queue_time_seconds` | histogram | time a request waits for its batch |
//! | `rankstack_scoring_seconds` | histogram | time to score one batch |
//! | `rankstack_batch_candidates` | histogram | candidates per batch |
//! | `rankstack_batch_requests` | histogram | requests per batch |
//! | `rankstack_queue_depth` | gauge | requests waiting |
//! | `rankstack_requests_in_flight` | gauge | inference requests received and not yet answered |
//! | `rankstack_model_version` | gauge | the served version (1 + successful reloads) |
//! | `rankstack_model_loads_total{result}` | counter | reloads, `ok` or `error` |

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds.
pub struct Histogram {
    bounds: Vec<f64>,
    state: Mutex<HistogramState>,
}

struct HistogramState {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// A histogram with these (increasing) bucket upper bounds; `+Inf` is implied.
    pub fn new(bounds: Vec<f64>) -> Self {
        let n = bounds.len();
        Self { bounds, state: Mutex::new(HistogramState { counts: vec![0; n], sum: 0.0, count: 0 }) }
    }

    /// Latency buckets: 100 µs to 10 s.
    pub fn seconds() -> Self {
        Self::new(vec![1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
    }

    /// Powers of two from 1 to 4096 (batch sizes).
    pub fn sizes() -> Self {
        Self::new((0..=12).map(|p| f64::from(1u32 << p)).collect())
    }

    /// Records one value.
    pub fn observe(&self, value: f64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            s.counts[i] += 1;
        }
        s.sum += value;
        s.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&s.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ =
            writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", s.count, s.sum, s.count);
    }
}

/// The latencies of the most recent requests, for exact recent quantiles.
struct Recent {
    values: VecDeque<f64>,
    capacity: usize,
}

/// Every metric of the server.
pub struct Metrics {
    infer_codes: Mutex<BTreeMap<u16, u64>>,
    http_codes: Mutex<BTreeMap<u16, u64>>,
    candidates: Mutex<u64>,
    /// Inference latency, receipt to response.
    pub latency: Histogram,
    recent: Mutex<Recent>,
    /// Time in the queue.
    pub queue_time: Histogram,
    /// Time to score a batch.
    pub scoring_time: Histogram,
    /// Candidates per batch.
    pub batch_candidates: Histogram,
    /// Requests per batch.
    pub batch_requests: Histogram,
    loads: Mutex<BTreeMap<&'static str, u64>>,
    in_flight: AtomicUsize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zero.
    pub fn new() -> Self {
        Self {
            infer_codes: Mutex::default(),
            http_codes: Mutex::default(),
            candidates: Mutex::new(0),
            latency: Histogram::seconds(),
            recent: Mutex::new(Recent { values: VecDeque::with_capacity(4096), capacity: 4096 }),
            queue_time: Histogram::seconds(),
            scoring_time: Histogram::seconds(),
            batch_candidates: Histogram::sizes(),
            batch_requests: Histogram::sizes(),
            loads: Mutex::default(),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Counts an HTTP response.
    pub fn http_response(&self, code: u16) {
        *self.http_codes.lock().unwrap_or_else(|e| e.into_inner()).entry(code).or_default() += 1;
    }

    /// An inference request arrived (answered later with [`Metrics::infer_response`]).
    pub fn infer_started(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts an inference response and its latency; `candidates` scored on success.
    pub fn infer_response(&self, code: u16, seconds: f64, candidates: usize) {
        let _ = self.in_flight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        *self.infer_codes.lock().unwrap_or_else(|e| e.into_inner()).entry(code).or_default() += 1;
        *self.candidates.lock().unwrap_or_else(|e| e.into_inner()) += candidates as u64;
        self.latency.observe(seconds);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.values.len() == recent.capacity {
            recent.values.pop_front();
        }
        recent.values.push_back(seconds);
    }

    /// Counts a reload.
    pub fn model_load(&self, ok: bool) {
        *self.loads.lock().unwrap_or_else(|e| e.into_inner()).entry(if ok { "ok" } else { "error" }).or_default() += 1;
    }

    /// The exposition text; `queue_depth` and `model_version` are read by the caller.
    pub fn render(&self, queue_depth: usize, model_version: u64) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, label: &str, values: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (l, v) in values {
                let _ = writeln!(out, "{name}{{{label}=\"{l}\"}} {v}");
            }
        };
        let codes = |m: &Mutex<BTreeMap<u16, u64>>| {
            m.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.to_string(), *v)).collect::<Vec<_>>()
        };
        counter(
            &mut out,
            "rankstack_infer_requests_total",
            "Inference requests by HTTP status.",
            "code",
            codes(&self.infer_codes),
        );
        counter(&mut out, "rankstack_http_requests_total", "HTTP requests by status.", "code", codes(&self.http_codes));
        let candidates = *self.candidates.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "# HELP rankstack_infer_candidates_total Candidates scored.\n# TYPE rankstack_infer_candidates_total counter\nrankstack_infer_candidates_total {candidates}"
        );
        self.latency.render(&mut out, "rankstack_request_latency_seconds", "Inference latency, receipt to response.");
        {
            let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            let mut sorted: Vec<f64> = recent.values.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            let name = "rankstack_request_latency_recent_seconds";
            let _ = writeln!(
                out,
                "# HELP {name} Inference latency quantiles over the last 4096 requests.\n# TYPE {name} summary"
            );
            for q in [0.5, 0.99, 0.999] {
                let v = if sorted.is_empty() {
                    f64::NAN
                } else {
                    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
                };
                let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {v}");
            }
            let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", sorted.iter().sum::<f64>(), sorted.len());
        }
        self.queue_time.render(&mut out, "rankstack_queue_time_seconds", "Time a request waits for its batch.");
        self.scoring_time.render(&mut out, "rankstack_scoring_seconds", "Time to score one batch.");
        self.batch_candidates.render(&mut out, "rankstack_batch_candidates", "Candidates per scored batch.");
        self.batch_requests.render(&mut out, "rankstack_batch_requests", "Requests per scored batch.");
        let _ = writeln!(
            out,
            "# HELP rankstack_queue_depth Requests waiting.\n# TYPE rankstack_queue_depth gauge\nrankstack_queue_depth {queue_depth}"
        );
        let _ = writeln!(
            out,
            "# HELP rankstack_model_version The served model version.\n# TYPE rankstack_model_version gauge\nrankstack_model_version {model_version}"
        );
        let _ = writeln!(
            out,
            "# HELP rankstack_requests_in_flight Inference requests not yet answered.\n# TYPE rankstack_requests_in_flight gauge\nrankstack_requests_in_flight {}",
            self.in_flight.load(Ordering::SeqCst)
        );
        let loads: Vec<(String, u64)> =
            self.loads.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.to_string(), *v)).collect();
        counter(&mut out, "rankstack_model_loads_total", "Model reloads by result.", "result", loads);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_quantiles_exact() {
        let m = Metrics::new();
        for (i, code) in [200u16, 200, 400, 503].iter().enumerate() {
            m.infer_response(*code, 0.001 * (i + 1) as f64, 1);
        }
        m.batch_candidates.observe(3.0);
        m.batch_candidates.observe(300.0);
        let text = m.render(2, 5);
        for line in [
            "rankstack_infer_requests_total{code=\"200\"} 2",
            "rankstack_infer_requests_total{code=\"503\"} 1",
            "rankstack_batch_candidates_bucket{le=\"2\"} 0",
            "rankstack_batch_candidates_bucket{le=\"4\"} 1",
            "rankstack_batch_candidates_bucket{le=\"512\"} 2",
            "rankstack_batch_candidates_count 2",
            "rankstack_request_latency_recent_seconds{quantile=\"0.5\"} 0.002",
            "rankstack_request_latency_recent_seconds{quantile=\"0.99\"} 0.004",
            "rankstack_queue_depth 2",
            "rankstack_model_version 5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
