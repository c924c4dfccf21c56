//! Counting while a run is hot: latency histograms (HdrHistogram), counters, and errors by
//! cause, built so that thousands of connection tasks on several threads can record without
//! contending on one lock or one cache line.
//!
//! Latencies are buffered per connection and flushed into one of a few sharded histograms;
//! counters are spread over padded atomics. Turning them into report numbers happens here too
//! ([`LatencySummary`], [`ErrorCount`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::{Cause, ClientError};

/// Shards for histograms and counters: enough to keep a few worker threads apart.
const SHARDS: usize = 16;

/// Largest latency a histogram holds exactly (longer ones are clamped): one hour.
const MAX_TRACKABLE_NS: u64 = 3_600_000_000_000;

/// A fresh latency histogram in nanoseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts; fall back to auto-resizing otherwise.
    Histogram::new_with_bounds(1, MAX_TRACKABLE_NS, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|_| unreachable!("3 significant digits are valid"))
}

/// A value on its own cache line(s).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// Latency histograms shared by all connections of a run.
pub struct Latencies {
    shards: Vec<Padded<Mutex<Histogram<u64>>>>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Padded(Mutex::new(new_histogram())))
                .collect(),
        }
    }
}

impl Latencies {
    /// A recorder for one connection; `index` picks its shard.
    pub fn recorder(self: &Arc<Self>, index: usize) -> LatencyRecorder {
        LatencyRecorder {
            shared: self.clone(),
            shard: index % SHARDS,
            pending: Vec::with_capacity(LatencyRecorder::BATCH),
        }
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut total = new_histogram();
        for shard in &self.shards {
            let shard = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
            // Same bounds: merging cannot fail; a failure would only lose samples.
            let _ = total.add(&*shard);
        }
        total
    }

    /// Records one value directly (for rare events such as connects).
    pub fn record(&self, index: usize, ns: u64) {
        let mut shard = self.shards[index % SHARDS]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shard.saturating_record(ns.max(1));
    }
}

/// Buffers one connection's latencies and flushes them in batches (and when dropped).
pub struct LatencyRecorder {
    shared: Arc<Latencies>,
    shard: usize,
    pending: Vec<u64>,
}

impl LatencyRecorder {
    const BATCH: usize = 64;

    pub fn record(&mut self, ns: u64) {
        self.pending.push(ns.max(1));
        if self.pending.len() >= Self::BATCH {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut shard = self.shared.shards[self.shard]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for ns in self.pending.drain(..) {
            shard.saturating_record(ns);
        }
    }
}

impl Drop for LatencyRecorder {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A counter many tasks add to: one padded atomic per shard.
pub struct Counter {
    cells: Vec<Padded<AtomicU64>>,
}

impl Default for Counter {
    fn default() -> Self {
        Self {
            cells: (0..SHARDS).map(|_| Padded(AtomicU64::new(0))).collect(),
        }
    }
}

impl Counter {
    /// Adds `n` in the cell of `index` (a connection number, say).
    pub fn add(&self, index: usize, n: u64) {
        self.cells[index % SHARDS].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.cells.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

/// Latency percentiles for the report, in microseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

fn us(ns: u64) -> f64 {
    // Two decimals of a microsecond are more than 3 significant digits allow anyway.
    (ns as f64 / 10.0).round() / 100.0
}

impl LatencySummary {
    /// Percentiles of a nanosecond histogram; all zero when it is empty.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            count: histogram.len(),
            min_us: us(histogram.min()),
            mean_us: us(histogram.mean().round() as u64),
            p50_us: us(histogram.value_at_quantile(0.50)),
            p90_us: us(histogram.value_at_quantile(0.90)),
            p99_us: us(histogram.value_at_quantile(0.99)),
            p999_us: us(histogram.value_at_quantile(0.999)),
            max_us: us(histogram.max()),
        }
    }

    /// `p50 1.23 ms  p90 ...` on one line, each value in a readable unit.
    pub fn one_line(&self) -> String {
        if self.count == 0 {
            return "no samples".to_owned();
        }
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {}, min {}, n={})",
            human_us(self.p50_us),
            human_us(self.p90_us),
            human_us(self.p99_us),
            human_us(self.p999_us),
            human_us(self.max_us),
            human_us(self.mean_us),
            human_us(self.min_us),
            self.count
        )
    }
}

/// A microsecond value as `850 us`, `12.3 ms` or `1.25 s`.
pub fn human_us(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0} us")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1_000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

/// A duration in seconds with millisecond precision, for reports.
pub fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Errors of one kind in the report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ErrorCount {
    /// What the client was doing: `connect`, `join`, `publish`, `receive`, `close`...
    pub stage: &'static str,
    pub cause: Cause,
    pub count: u64,
    /// The first error of this kind, verbatim.
    pub example: String,
}

/// (stage, cause) -> (count, first example).
type ErrorMap = BTreeMap<(&'static str, Cause), (u64, String)>;

/// Errors by (stage, cause), with the first message of each kind kept as an example.
#[derive(Default)]
pub struct ErrorTally {
    entries: Mutex<ErrorMap>,
}

impl ErrorTally {
    pub fn record(&self, stage: &'static str, error: &ClientError) {
        self.record_cause(stage, error.cause(), || error.to_string());
    }

    pub fn record_cause(
        &self,
        stage: &'static str,
        cause: Cause,
        example: impl FnOnce() -> String,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .entry((stage, cause))
            .and_modify(|(count, _)| *count += 1)
            .or_insert_with(|| (1, example()));
    }

    /// Everything recorded, most frequent first.
    pub fn snapshot(&self) -> Vec<ErrorCount> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<ErrorCount> = entries
            .iter()
            .map(|(&(stage, cause), (count, example))| ErrorCount {
                stage,
                cause,
                count: *count,
                example: example.clone(),
            })
            .collect();
        list.sort_by_key(|e| std::cmp::Reverse(e.count));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_reported_in_microseconds() {
        let mut h = new_histogram();
        // 1..=1000 us, uniformly.
        for i in 1..=1000u64 {
            h.record(i * 1_000).unwrap();
        }
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 1000);
        assert_eq!(s.min_us, 1.0);
        // HdrHistogram with 3 significant digits: within 0.1%.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.01;
        assert!(close(s.p50_us, 500.0), "{s:?}");
        assert!(close(s.p90_us, 900.0), "{s:?}");
        assert!(close(s.p99_us, 990.0), "{s:?}");
        assert!(close(s.p999_us, 999.0), "{s:?}");
        assert!(close(s.max_us, 1000.0), "{s:?}");
        assert!(close(s.mean_us, 500.5), "{s:?}");
        assert!(s.one_line().starts_with("p50 500 us"), "{}", s.one_line());
    }

    #[test]
    fn empty_histograms_report_zero() {
        let s = LatencySummary::of(&new_histogram());
        assert_eq!(s, LatencySummary::default());
        assert_eq!(s.one_line(), "no samples");
    }

    #[test]
    fn recorders_flush_into_shards_and_merge() {
        let lat = Arc::new(Latencies::default());
        {
            let mut a = lat.recorder(0);
            let mut b = lat.recorder(1);
            for _ in 0..100 {
                a.record(2_000);
                b.record(4_000_000);
            }
            // 100 is not a multiple of the batch: the rest is flushed on drop.
        }
        lat.record(3, 1_000_000_000);
        let merged = lat.merged();
        assert_eq!(merged.len(), 201);
        let s = LatencySummary::of(&merged);
        assert_eq!(human_us(s.max_us), "1.00 s");
        assert_eq!(human_us(s.min_us), "2 us");
        assert_eq!(human_us(s.p50_us), "4.00 ms");
    }

    #[test]
    fn latency_units_read_well() {
        assert_eq!(human_us(850.0), "850 us");
        assert_eq!(human_us(12_345.0), "12.35 ms");
        assert_eq!(human_us(2_500_000.0), "2.50 s");
    }

    #[test]
    fn counters_and_errors_add_up() {
        let c = Counter::default();
        for i in 0..40 {
            c.add(i, 2);
        }
        assert_eq!(c.get(), 80);
        let t = ErrorTally::default();
        t.record("connect", &ClientError::Timeout("x"));
        t.record("connect", &ClientError::Timeout("y"));
        t.record("join", &ClientError::Status(403));
        let snap = t.snapshot();
        assert_eq!(snap.iter().map(|e| e.count).sum::<u64>(), 3);
        assert_eq!(snap[0].count, 2);
        assert_eq!(snap[0].example, "timed out x");
        assert_eq!(snap[1].cause, Cause::Handshake);
    }
}
