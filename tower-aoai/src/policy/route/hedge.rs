//! Hedging: when a second attempt goes to a different backend, and how much hedging may cost.
//!
//! Each backend keeps a fixed-size log-linear histogram of its time to response headers (time to
//! first byte for streams), four buckets per doubling from 1 ms to ~2 min, halved whenever it
//! holds [`DECAY_AT`] samples (and by the router every 30 s) so it follows the present. A hedge is sent after the primary
//! backend's percentile (default p95), once it has `min_samples`, while the hedge budget (a
//! [`RetryBudget`] at `ratio` of calls, default 5 %) allows.

use std::time::Duration;

use crate::policy::{ConfigError, RetryBudget};

const SUB: usize = 4;
const FIRST_OCTAVE: u32 = 10; // 2^10 µs ~ 1 ms
const OCTAVES: usize = 17; // up to 2^27 µs ~ 134 s
const BUCKETS: usize = 2 + OCTAVES * SUB;
/// A histogram is halved when it holds this many samples.
pub const DECAY_AT: u32 = 2048;

/// A bounded distribution of latencies (time to response headers).
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    counts: [u32; BUCKETS],
    total: u32,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
            total: 0,
        }
    }
}

impl LatencyHistogram {
    /// Adds a sample.
    pub fn record(&mut self, latency: Duration) {
        if self.total >= DECAY_AT {
            self.decay();
        }
        self.counts[bucket(latency)] += 1;
        self.total += 1;
    }

    /// Halves every count, so older samples weigh half as much as the ones that follow.
    pub fn decay(&mut self) {
        self.total = 0;
        for c in &mut self.counts {
            *c /= 2;
            self.total += *c;
        }
    }

    /// Samples held (recent ones weigh more after a decay).
    pub fn count(&self) -> u32 {
        self.total
    }

    /// The latency below which a fraction `q` (0..=1) of the samples fall, as the upper edge of
    /// its bucket (at most 25 % above the true value); `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * f64::from(self.total)).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                return Some(upper_edge(i));
            }
        }
        Some(upper_edge(BUCKETS - 1))
    }
}

fn bucket(latency: Duration) -> usize {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    if us < 1 << FIRST_OCTAVE {
        return 0;
    }
    let msb = 63 - us.leading_zeros();
    let octave = (msb - FIRST_OCTAVE) as usize;
    if octave >= OCTAVES {
        return BUCKETS - 1;
    }
    let sub = ((us >> (msb - 2)) & 3) as usize;
    1 + octave * SUB + sub
}

fn upper_edge(index: usize) -> Duration {
    if index == 0 {
        return Duration::from_micros(1 << FIRST_OCTAVE);
    }
    let i = (index - 1).min(OCTAVES * SUB - 1);
    let (octave, sub) = (i / SUB, i % SUB);
    let base = 1u64 << (FIRST_OCTAVE as usize + octave);
    Duration::from_micros(base * (SUB as u64 + 1 + sub as u64) / SUB as u64)
}

/// When to hedge, and how much hedging may cost.
#[derive(Debug, Clone)]
pub struct HedgePolicy {
    enabled: bool,
    quantile: f64,
    min_samples: u32,
    min_delay: Duration,
    budget: RetryBudget,
}

impl Default for HedgePolicy {
    /// Hedge after the primary's p95 (at least 10 ms), once it has 20 samples, within 5 % extra
    /// requests over a 10 s window.
    fn default() -> Self {
        Self {
            enabled: true,
            quantile: 0.95,
            min_samples: 20,
            min_delay: Duration::from_millis(10),
            budget: RetryBudget::new(Duration::from_secs(10), 0, 0.05)
                .expect("default hedge budget is valid"),
        }
    }
}

impl HedgePolicy {
    /// Hedging switched off.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// Hedge after this quantile of the primary backend's latency (0.5..1, default 0.95).
    pub fn with_quantile(mut self, quantile: f64) -> Result<Self, ConfigError> {
        if !(0.5..1.0).contains(&quantile) {
            return Err(ConfigError::new(
                "hedge.quantile",
                format!("must be in [0.5, 1), got {quantile}"),
            ));
        }
        self.quantile = quantile;
        Ok(self)
    }

    /// Samples a backend needs before calls to it are hedged (default 20).
    pub fn with_min_samples(mut self, min_samples: u32) -> Self {
        self.min_samples = min_samples.max(1);
        self
    }

    /// The shortest hedge delay, however fast the backend (default 10 ms).
    pub fn with_min_delay(mut self, min_delay: Duration) -> Self {
        self.min_delay = min_delay;
        self
    }

    /// At most `ratio` extra requests per call (default 0.05), over a window of `ttl`.
    pub fn with_budget(mut self, ttl: Duration, ratio: f64) -> Result<Self, ConfigError> {
        if !(0.0..=1.0).contains(&ratio) {
            return Err(ConfigError::new(
                "hedge.ratio",
                format!("must be between 0 and 1, got {ratio}"),
            ));
        }
        self.budget = RetryBudget::new(ttl, 0, ratio)?;
        Ok(self)
    }

    /// Whether hedging is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The hedge delay for a backend with latency distribution `latency`, if it is hedged.
    pub fn delay(&self, latency: &LatencyHistogram) -> Option<Duration> {
        if !self.enabled || latency.count() < self.min_samples {
            return None;
        }
        latency
            .quantile(self.quantile)
            .map(|d| d.max(self.min_delay))
    }

    pub(crate) fn budget_mut(&mut self) -> &mut RetryBudget {
        &mut self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut h = LatencyHistogram::default();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).unwrap();
        let p95 = h.quantile(0.95).unwrap();
        assert!(
            p50 >= Duration::from_millis(50) && p50 <= Duration::from_millis(63),
            "{p50:?}"
        );
        assert!(
            p95 >= Duration::from_millis(95) && p95 <= Duration::from_millis(119),
            "{p95:?}"
        );
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }

    #[test]
    fn extremes_do_not_panic_and_memory_is_bounded() {
        let mut h = LatencyHistogram::default();
        h.record(Duration::ZERO);
        h.record(Duration::MAX);
        assert!(h.quantile(1.0).unwrap() >= Duration::from_secs(100));
        for _ in 0..10_000 {
            h.record(Duration::from_millis(5));
        }
        assert!(h.count() <= DECAY_AT + 1);
        assert!(h.quantile(0.99).unwrap() <= Duration::from_millis(7));
    }

    #[test]
    fn delay_needs_samples() {
        let p = HedgePolicy::default();
        let mut h = LatencyHistogram::default();
        for _ in 0..19 {
            h.record(Duration::from_millis(100));
        }
        assert_eq!(p.delay(&h), None);
        h.record(Duration::from_millis(100));
        assert!(p.delay(&h).is_some());
        assert_eq!(HedgePolicy::disabled().delay(&h), None);
        assert_eq!(
            HedgePolicy::default()
                .with_quantile(1.0)
                .unwrap_err()
                .field(),
            "hedge.quantile"
        );
    }
}
