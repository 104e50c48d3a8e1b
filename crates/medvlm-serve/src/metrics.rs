//! Prometheus metrics, written by hand in the text exposition format (version 0.0.4):
//! request counts per route and status, a request-latency histogram per route, the queue
//! depth, a batch-size histogram and the number of forward passes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds of the batch-size histogram's buckets.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A cumulative histogram.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the observations.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// The service's counters.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    batch_sizes: Mutex<Histogram>,
    forward_passes: AtomicU64,
    rejected_full: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            latency: Mutex::default(),
            batch_sizes: Mutex::new(Histogram::new(BATCH_BUCKETS)),
            forward_passes: AtomicU64::new(0),
            rejected_full: AtomicU64::new(0),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a metrics lock leaves consistent counters; keep counting.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts one finished request.
    pub fn record_request(&self, route: &str, status: u16, seconds: f64) {
        *lock(&self.requests)
            .entry((route.to_string(), status))
            .or_default() += 1;
        lock(&self.latency)
            .entry(route.to_string())
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
            .observe(seconds);
    }

    /// Counts one forward pass over `size` images.
    pub fn record_batch(&self, size: usize) {
        self.forward_passes.fetch_add(1, Ordering::Relaxed);
        lock(&self.batch_sizes).observe(size as f64);
    }

    /// Counts one request refused because the queue was full.
    pub fn record_rejected(&self) {
        self.rejected_full.fetch_add(1, Ordering::Relaxed);
    }

    /// Forward passes run so far.
    pub fn forward_passes(&self) -> u64 {
        self.forward_passes.load(Ordering::Relaxed)
    }

    /// The batch-size histogram so far.
    pub fn batch_sizes(&self) -> Histogram {
        lock(&self.batch_sizes).clone()
    }

    /// Requests counted for `route` with `status`.
    pub fn requests(&self, route: &str, status: u16) -> u64 {
        lock(&self.requests)
            .get(&(route.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    /// The exposition text; `queue_depth` is the number of images waiting for the model.
    pub fn render(&self, queue_depth: usize, queue_capacity: usize) -> String {
        let mut out = String::new();
        out.push_str("# HELP medvlm_requests_total HTTP requests answered, by route and status.\n");
        out.push_str("# TYPE medvlm_requests_total counter\n");
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "medvlm_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str("# HELP medvlm_request_duration_seconds Request latency, by route.\n");
        out.push_str("# TYPE medvlm_request_duration_seconds histogram\n");
        for (route, h) in lock(&self.latency).iter() {
            h.write(
                &mut out,
                "medvlm_request_duration_seconds",
                &format!("route=\"{}\"", escape(route)),
            );
        }
        out.push_str("# HELP medvlm_queue_depth Images accepted and waiting for the model.\n");
        out.push_str("# TYPE medvlm_queue_depth gauge\n");
        let _ = writeln!(out, "medvlm_queue_depth {queue_depth}");
        out.push_str("# HELP medvlm_queue_capacity Images the queue holds before answering 429.\n");
        out.push_str("# TYPE medvlm_queue_capacity gauge\n");
        let _ = writeln!(out, "medvlm_queue_capacity {queue_capacity}");
        out.push_str("# HELP medvlm_queue_rejected_total Images refused with 429 (queue full).\n");
        out.push_str("# TYPE medvlm_queue_rejected_total counter\n");
        let _ = writeln!(
            out,
            "medvlm_queue_rejected_total {}",
            self.rejected_full.load(Ordering::Relaxed)
        );
        out.push_str("# HELP medvlm_batch_size Images per forward pass of the model.\n");
        out.push_str("# TYPE medvlm_batch_size histogram\n");
        lock(&self.batch_sizes).write(&mut out, "medvlm_batch_size", "");
        out.push_str("# HELP medvlm_forward_passes_total Batched forward passes run.\n");
        out.push_str("# TYPE medvlm_forward_passes_total counter\n");
        let _ = writeln!(out, "medvlm_forward_passes_total {}", self.forward_passes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_rendered_with_inf_sum_and_count() {
        let m = Metrics::default();
        m.record_batch(1);
        m.record_batch(3);
        m.record_request("/v1/embeddings", 200, 0.02);
        let text = m.render(2, 8);
        assert!(
            text.contains("medvlm_batch_size_bucket{le=\"1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("medvlm_batch_size_bucket{le=\"2\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("medvlm_batch_size_bucket{le=\"4\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("medvlm_batch_size_bucket{le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("medvlm_batch_size_sum 4\n"), "{text}");
        assert!(text.contains("medvlm_forward_passes_total 2\n"), "{text}");
        assert!(text.contains("medvlm_requests_total{route=\"/v1/embeddings\",status=\"200\"} 1\n"));
        assert!(text.contains(
            "medvlm_request_duration_seconds_bucket{route=\"/v1/embeddings\",le=\"0.01\"} 0\n"
        ));
        assert!(text.contains(
            "medvlm_request_duration_seconds_bucket{route=\"/v1/embeddings\",le=\"0.025\"} 1\n"
        ));
        assert!(text.contains("medvlm_queue_depth 2\n"));
    }
}
