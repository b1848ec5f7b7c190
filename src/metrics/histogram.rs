//! A latency histogram made of atomics: observing is a few relaxed atomic adds, no lock.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Upper bounds of the buckets in seconds, from well below the HTTP floor (about 0.2 ms) to a
/// long prewarm or image pull.
pub const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Counts per bucket (not cumulative; the last one is `+Inf`) and the sum of all observations.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A consistent-enough copy of a histogram for rendering.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Cumulative counts per bucket of [`BUCKETS`], then `+Inf`.
    pub cumulative: Vec<u64>,
    /// Sum of the observations in seconds.
    pub sum: f64,
}

impl Snapshot {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The current figures.
    pub fn snapshot(&self) -> Snapshot {
        let mut total = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|count| {
                total += count.load(Ordering::Relaxed);
                total
            })
            .collect();
        Snapshot {
            cumulative,
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_cumulative_buckets() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(300));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(100));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.cumulative[0], 1); // ≤ 0.5 ms
        assert_eq!(snapshot.cumulative[2], 1); // ≤ 2.5 ms
        assert_eq!(snapshot.cumulative[3], 2); // ≤ 5 ms
        assert_eq!(snapshot.cumulative[BUCKETS.len() - 1], 2); // ≤ 60 s
        assert_eq!(snapshot.count(), 3);
        assert!((snapshot.sum - 100.0033).abs() < 1e-9, "{}", snapshot.sum);
    }
}
