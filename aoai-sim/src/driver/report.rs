//! What a run measured.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tower_aoai::policy::classify::{Classification, Outcome};

/// The results of a virtual-time run. Equal seeds give equal reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Calls that arrived.
    pub calls: u64,
    /// Calls that succeeded.
    pub successes: u64,
    /// Calls that failed, by final outcome (`Outcome::as_str`).
    pub failures: BTreeMap<&'static str, u64>,
    /// Calls still unfinished when the run ended.
    pub unfinished: u64,
    /// Attempts sent.
    pub attempts: u64,
    /// Attempts sent per target (index into the workload's `targets`).
    pub attempts_by_target: Vec<u64>,
    /// 429 attempts by cause as the client classified them (`quota`, `capacity`, `provisioned`,
    /// `unknown`).
    pub throttles: BTreeMap<&'static str, u64>,
    /// 403 "temporarily blocked" attempts.
    pub blocked: u64,
    /// Attempts that failed below HTTP (refused or reset) or with 5xx.
    pub errors: u64,
    /// Median latency of successful calls, arrival to finish (retries and waits included).
    pub latency_p50: Duration,
    /// 99th percentile latency of successful calls.
    pub latency_p99: Duration,
    /// First arrival to last finished call.
    pub makespan: Duration,
    /// The most attempts sent within any one-second window.
    pub max_sent_per_second: u64,
    pub(crate) first_arrival: Option<Duration>,
    pub(crate) last_finish: Option<Duration>,
}

impl Report {
    pub(crate) fn new(targets: usize) -> Self {
        Self {
            attempts_by_target: vec![0; targets],
            ..Self::default()
        }
    }

    pub(crate) fn record_attempt(&mut self, target: usize, class: &Classification) {
        self.attempts += 1;
        if let Some(n) = self.attempts_by_target.get_mut(target) {
            *n += 1;
        }
        match class.outcome {
            Outcome::Throttled(cause) => *self.throttles.entry(cause.as_str()).or_default() += 1,
            Outcome::Blocked => self.blocked += 1,
            Outcome::Transient(_) => self.errors += 1,
            _ => {}
        }
    }

    pub(crate) fn set_latencies(&mut self, latencies: &mut [Duration]) {
        latencies.sort_unstable();
        self.latency_p50 = percentile(latencies, 0.50);
        self.latency_p99 = percentile(latencies, 0.99);
        if let (Some(first), Some(last)) = (self.first_arrival, self.last_finish) {
            self.makespan = last.saturating_sub(first);
        }
    }

    /// All 429 attempts.
    pub fn throttled(&self) -> u64 {
        self.throttles.values().sum()
    }

    /// Calls that failed.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Successful calls over all calls (1 when there were none).
    pub fn success_rate(&self) -> f64 {
        if self.calls == 0 {
            1.0
        } else {
            self.successes as f64 / self.calls as f64
        }
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "calls {} ok {} ({:.1} %) failed {} unfinished {}",
            self.calls,
            self.successes,
            self.success_rate() * 100.0,
            self.failed(),
            self.unfinished
        )?;
        writeln!(
            f,
            "attempts {} (per target {:?}) 429 {:?} 403 {} errors {}",
            self.attempts, self.attempts_by_target, self.throttles, self.blocked, self.errors
        )?;
        writeln!(f, "failures {:?}", self.failures)?;
        write!(
            f,
            "latency p50 {:.3}s p99 {:.3}s makespan {:.1}s max sent/1s {}",
            self.latency_p50.as_secs_f64(),
            self.latency_p99.as_secs_f64(),
            self.makespan.as_secs_f64(),
            self.max_sent_per_second
        )
    }
}
