//! A failure-rate circuit breaker with half-open probes, for 5xx answers and connection errors.
//!
//! Closed: every attempt's result lands in a ring of the last 32; when at least `min_calls` of
//! those within `window` are known and at least `failure_ratio` of them failed, the breaker opens.
//! Open: nothing is sent until `open_for` has passed (doubling on every reopen, up to
//! `max_open_for`). Half-open: one probe at a time; a success closes the breaker, a failure opens
//! it again.

use std::time::{Duration, Instant};

use crate::policy::ConfigError;

const RING: usize = 32;

/// When a breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    window: Duration,
    min_calls: u32,
    failure_ratio: f64,
    open_for: Duration,
    max_open_for: Duration,
}

impl Default for BreakerPolicy {
    /// Opens at >= 50 % failures among >= 5 results of the last 60 s; open 30 s, doubling on each
    /// failed probe up to 2 min.
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            min_calls: 5,
            failure_ratio: 0.5,
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(120),
        }
    }
}

impl BreakerPolicy {
    /// A breaker that opens when at least `failure_ratio` of at least `min_calls` results within
    /// `window` failed, and stays open `open_for` (doubling on each reopen up to `max_open_for`).
    pub fn new(
        window: Duration,
        min_calls: u32,
        failure_ratio: f64,
        open_for: Duration,
        max_open_for: Duration,
    ) -> Result<Self, ConfigError> {
        if window.is_zero() {
            return Err(ConfigError::new(
                "breaker.window",
                "must be greater than zero",
            ));
        }
        if min_calls == 0 || min_calls as usize > RING {
            return Err(ConfigError::new(
                "breaker.min_calls",
                format!("must be between 1 and {RING}, got {min_calls}"),
            ));
        }
        if !(failure_ratio > 0.0 && failure_ratio <= 1.0) {
            return Err(ConfigError::new(
                "breaker.failure_ratio",
                format!("must be in (0, 1], got {failure_ratio}"),
            ));
        }
        if open_for.is_zero() {
            return Err(ConfigError::new(
                "breaker.open_for",
                "must be greater than zero",
            ));
        }
        if max_open_for < open_for {
            return Err(ConfigError::new(
                "breaker.max_open_for",
                format!("must be at least breaker.open_for ({open_for:?}), got {max_open_for:?}"),
            ));
        }
        Ok(Self {
            window,
            min_calls,
            failure_ratio,
            open_for,
            max_open_for,
        })
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// Nothing is sent until the instant.
    Open {
        /// When a probe may go.
        until: Instant,
    },
    /// One probe at a time decides.
    HalfOpen {
        /// Whether the probe is in flight.
        probing: bool,
    },
}

/// One backend's breaker.
#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    state: BreakerState,
    ring: [Option<(Instant, bool)>; RING],
    /// Failed results in `ring` (of any age): with none, no result can open the breaker, and the
    /// ring is not scanned.
    failures: u32,
    next: usize,
    reopens: u32,
}

impl Breaker {
    pub(crate) fn new() -> Self {
        Self {
            state: BreakerState::Closed,
            ring: [None; RING],
            failures: 0,
            next: 0,
            reopens: 0,
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        self.state
    }

    /// Moves an open breaker whose time is up to half-open.
    pub(crate) fn tick(&mut self, now: Instant) {
        if let BreakerState::Open { until } = self.state
            && now >= until
        {
            self.state = BreakerState::HalfOpen { probing: false };
        }
    }

    #[cfg(test)]
    /// Whether an attempt may be sent now (after [`tick`](Self::tick)).
    pub(crate) fn allows(&self) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { probing } => !probing,
        }
    }

    #[cfg(test)]
    /// When the breaker lets an attempt through again, if it is open.
    pub(crate) fn open_until(&self) -> Option<Instant> {
        match self.state {
            BreakerState::Open { until } => Some(until),
            _ => None,
        }
    }

    pub(crate) fn on_send(&mut self) {
        if let BreakerState::HalfOpen { .. } = self.state {
            self.state = BreakerState::HalfOpen { probing: true };
        }
    }

    /// An attempt that was sent ended without a result (cancelled): a probe slot is freed.
    pub(crate) fn on_cancel(&mut self) {
        if let BreakerState::HalfOpen { probing: true } = self.state {
            self.state = BreakerState::HalfOpen { probing: false };
        }
    }

    /// Records an attempt's result (`failed`: a 5xx or a connection error).
    pub(crate) fn on_result(&mut self, policy: &BreakerPolicy, failed: bool, now: Instant) {
        match self.state {
            BreakerState::HalfOpen { .. } => {
                if failed {
                    self.reopens = self.reopens.saturating_add(1);
                    self.open(policy, now);
                } else {
                    self.state = BreakerState::Closed;
                    self.ring = [None; RING];
                    self.failures = 0;
                    self.reopens = 0;
                }
            }
            // A result of an attempt sent before the breaker opened changes nothing.
            BreakerState::Open { .. } => {}
            BreakerState::Closed => {
                if let Some((_, true)) = self.ring[self.next] {
                    self.failures -= 1;
                }
                self.ring[self.next] = Some((now, failed));
                self.failures += u32::from(failed);
                self.next = (self.next + 1) % RING;
                debug_assert_eq!(
                    self.failures as usize,
                    self.ring.iter().flatten().filter(|(_, f)| *f).count()
                );
                // The failure ratio is above zero: without a failure nothing can open.
                if self.failures == 0 {
                    return;
                }
                let since = now.checked_sub(policy.window);
                let (calls, failures) = self
                    .ring
                    .iter()
                    .flatten()
                    .filter(|(t, _)| since.is_none_or(|s| *t >= s))
                    .fold((0u32, 0u32), |(c, f), (_, failed)| {
                        (c + 1, f + u32::from(*failed))
                    });
                if calls >= policy.min_calls
                    && f64::from(failures) >= policy.failure_ratio * f64::from(calls)
                {
                    self.open(policy, now);
                }
            }
        }
    }

    fn open(&mut self, policy: &BreakerPolicy, now: Instant) {
        let factor = 1u32 << self.reopens.min(16);
        let open_for = policy
            .open_for
            .checked_mul(factor)
            .unwrap_or(policy.max_open_for)
            .min(policy.max_open_for);
        self.state = BreakerState::Open {
            until: now.checked_add(open_for).unwrap_or(now),
        };
        self.ring = [None; RING];
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_failure_rate_and_recovers_through_a_probe() {
        let p = BreakerPolicy::default();
        let t0 = Instant::now();
        let mut b = Breaker::new();
        for i in 0..4 {
            b.on_result(&p, i % 2 == 0, t0);
        }
        assert!(b.allows());
        b.on_result(&p, true, t0); // 3 of 5 failed
        assert_eq!(b.open_until(), Some(t0 + Duration::from_secs(30)));
        b.tick(t0 + Duration::from_secs(29));
        assert!(!b.allows());
        b.tick(t0 + Duration::from_secs(30));
        assert!(b.allows());
        b.on_send();
        assert!(!b.allows(), "one probe at a time");
        b.on_cancel();
        assert!(b.allows(), "a cancelled probe frees the slot");
        b.on_send();
        let t1 = t0 + Duration::from_secs(31);
        b.on_result(&p, true, t1);
        assert_eq!(
            b.open_until(),
            Some(t1 + Duration::from_secs(60)),
            "reopen doubles"
        );
        let t2 = t1 + Duration::from_secs(60);
        b.tick(t2);
        b.on_send();
        b.on_result(&p, false, t2);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn old_failures_leave_the_window() {
        let p = BreakerPolicy::default();
        let t0 = Instant::now();
        let mut b = Breaker::new();
        for _ in 0..4 {
            b.on_result(&p, true, t0);
        }
        b.on_result(&p, true, t0 + Duration::from_secs(61));
        assert!(b.allows());
    }

    #[test]
    fn bad_configuration_names_the_field() {
        let s = Duration::from_secs(1);
        assert_eq!(
            BreakerPolicy::new(s, 0, 0.5, s, s).unwrap_err().field(),
            "breaker.min_calls"
        );
        assert_eq!(
            BreakerPolicy::new(s, 5, 1.5, s, s).unwrap_err().field(),
            "breaker.failure_ratio"
        );
        assert_eq!(
            BreakerPolicy::new(s, 5, 0.5, s * 2, s).unwrap_err().field(),
            "breaker.max_open_for"
        );
    }
}
