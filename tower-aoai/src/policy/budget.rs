//! A retry budget, so that retries never turn a struggling backend into a storm.
//!
//! Every call deposits one unit; every retry withdraws one. Over a sliding window (`ttl`, default
//! 10 s) retries may not exceed `min_per_sec * ttl` plus `ratio` (default 20 %) of the calls made
//! in that window. This is Finagle's budget, the one tower's `TpsBudget` implements; ours takes
//! `now` as an argument so it runs under a virtual clock, and it keeps the window in a fixed ring
//! of slots (no allocation per call).

use std::time::{Duration, Instant};

use super::ConfigError;

const SLOTS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Index of the slot-length period this slot counts, since `origin`.
    period: u64,
    deposits: u32,
    withdrawals: u32,
}

/// A sliding-window retry budget (Finagle-style).
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ttl: Duration,
    reserve: u32,
    ratio: f64,
    origin: Option<Instant>,
    slots: [Slot; SLOTS],
}

impl Default for RetryBudget {
    /// 10 s window, 10 retries per second of reserve, plus 20 % of calls.
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 10, 0.2).expect("default retry budget is valid")
    }
}

impl RetryBudget {
    /// A budget over a window of `ttl`, allowing `min_per_sec` retries per second regardless of
    /// traffic, plus `ratio` retries per call made in the window.
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f64) -> Result<Self, ConfigError> {
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "budget.ttl",
                format!("must be between 1 s and 60 s, got {ttl:?}"),
            ));
        }
        if !(0.0..=1000.0).contains(&ratio) {
            return Err(ConfigError::new(
                "budget.ratio",
                format!("must be between 0 and 1000, got {ratio}"),
            ));
        }
        let reserve = u64::from(min_per_sec).saturating_mul(ttl.as_secs());
        Ok(Self {
            ttl,
            reserve: u32::try_from(reserve).unwrap_or(u32::MAX),
            ratio,
            origin: None,
            slots: [Slot::default(); SLOTS],
        })
    }

    /// A budget that never refuses a retry (for tests and for callers who bound retries otherwise).
    pub fn unlimited() -> Self {
        Self {
            reserve: u32::MAX,
            ..Self::default()
        }
    }

    /// Records a call (an original request, not a retry).
    pub fn deposit(&mut self, now: Instant) {
        let slot = self.slot(now);
        slot.deposits = slot.deposits.saturating_add(1);
    }

    /// Takes one retry from the budget; `false` when the budget is spent and the retry must not
    /// be made.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        // The first event of any kind anchors the slots, so windows do not depend on which came first.
        self.origin.get_or_insert(now);
        let (deposits, withdrawals) = self.totals(now);
        let allowed = f64::from(self.reserve) + self.ratio * f64::from(deposits);
        if f64::from(withdrawals) + 1.0 > allowed {
            return false;
        }
        let slot = self.slot(now);
        slot.withdrawals = slot.withdrawals.saturating_add(1);
        true
    }

    /// Retries still allowed in the current window.
    pub fn remaining(&self, now: Instant) -> u32 {
        let (deposits, withdrawals) = self.totals(now);
        let allowed = f64::from(self.reserve) + self.ratio * f64::from(deposits);
        (allowed - f64::from(withdrawals))
            .max(0.0)
            .min(f64::from(u32::MAX)) as u32
    }

    /// The window length.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn period(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        let slot_len = self.ttl.as_nanos() / SLOTS as u128;
        let elapsed = now.saturating_duration_since(origin).as_nanos();
        u64::try_from(elapsed / slot_len).unwrap_or(u64::MAX)
    }

    fn slot(&mut self, now: Instant) -> &mut Slot {
        let period = self.period(now);
        let slot = &mut self.slots[(period % SLOTS as u64) as usize];
        if slot.period != period {
            *slot = Slot {
                period,
                ..Slot::default()
            };
        }
        slot
    }

    /// Deposits and withdrawals over the window ending at `now`.
    fn totals(&self, now: Instant) -> (u32, u32) {
        let Some(origin) = self.origin else {
            return (0, 0);
        };
        let slot_len = self.ttl.as_nanos() / SLOTS as u128;
        let current = u64::try_from(now.saturating_duration_since(origin).as_nanos() / slot_len)
            .unwrap_or(u64::MAX);
        self.slots
            .iter()
            .filter(|s| s.period <= current && current - s.period < SLOTS as u64)
            .fold((0u32, 0u32), |(d, w), s| {
                (
                    d.saturating_add(s.deposits),
                    w.saturating_add(s.withdrawals),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_then_ratio() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(Duration::from_secs(10), 1, 0.2).unwrap();
        // Reserve: 1/s * 10 s = 10 retries with no traffic at all.
        for _ in 0..10 {
            assert!(b.try_withdraw(t0));
        }
        assert!(!b.try_withdraw(t0));
        // 50 calls buy 10 more.
        for _ in 0..50 {
            b.deposit(t0);
        }
        for _ in 0..10 {
            assert!(b.try_withdraw(t0));
        }
        assert!(!b.try_withdraw(t0));
        assert_eq!(b.remaining(t0), 0);
    }

    #[test]
    fn the_window_slides() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(Duration::from_secs(10), 1, 0.0).unwrap();
        for _ in 0..10 {
            assert!(b.try_withdraw(t0));
        }
        assert!(!b.try_withdraw(t0 + Duration::from_secs(9)));
        assert!(b.try_withdraw(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn bad_configuration_names_the_field() {
        assert_eq!(
            RetryBudget::new(Duration::ZERO, 1, 0.2)
                .unwrap_err()
                .field(),
            "budget.ttl"
        );
        assert_eq!(
            RetryBudget::new(Duration::from_secs(10), 1, -0.1)
                .unwrap_err()
                .field(),
            "budget.ratio"
        );
    }
}
