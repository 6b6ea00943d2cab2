//! How long to wait before the next attempt.
//!
//! Without a server hint: exponential backoff with *full jitter* (a uniform draw in
//! `[0, min(cap, base * 2^retry)]`, the variant that spreads a herd of clients best). With a hint:
//! the hint, plus a small upward jitter (never earlier than the server asked) so that clients which
//! received the same hint do not all come back in the same millisecond.

use std::time::Duration;

use super::ConfigError;

/// Exponential backoff with full jitter, and jittered server hints.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    hint_jitter: f64,
}

impl Default for Backoff {
    /// 0.5 s doubling to at most 8 s (the `openai` SDK's curve), hints jittered by up to 10 %.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(8),
            hint_jitter: 0.1,
        }
    }
}

impl Backoff {
    /// Backoff starting at `base` and doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Result<Self, ConfigError> {
        if base.is_zero() {
            return Err(ConfigError::new(
                "backoff.base",
                "must be greater than zero",
            ));
        }
        if cap < base {
            return Err(ConfigError::new(
                "backoff.cap",
                format!("must be at least backoff.base ({base:?}), got {cap:?}"),
            ));
        }
        Ok(Self {
            base,
            cap,
            hint_jitter: 0.1,
        })
    }

    /// The largest fraction added on top of a server hint (default 0.1: up to 10 % later).
    pub fn with_hint_jitter(mut self, fraction: f64) -> Result<Self, ConfigError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(ConfigError::new(
                "backoff.hint_jitter",
                format!("must be between 0 and 1, got {fraction}"),
            ));
        }
        self.hint_jitter = fraction;
        Ok(self)
    }

    /// The first delay's upper bound.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The largest delay without a server hint.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The upper bound of the un-hinted delay before retry number `retry` (0 for the first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.min(31));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before retry number `retry` (0 for the first), given the server's hint if any.
    pub fn delay(&self, retry: u32, hint: Option<Duration>, rng: &mut fastrand::Rng) -> Duration {
        match hint {
            Some(hint) => hint.saturating_add(hint.mul_f64(self.hint_jitter * rng.f64())),
            None => self.ceiling(retry).mul_f64(rng.f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhinted_delays_stay_under_the_doubling_ceiling() {
        let b = Backoff::default();
        let mut rng = fastrand::Rng::with_seed(7);
        for retry in 0..40 {
            let ceiling = b.ceiling(retry);
            assert!(ceiling <= b.cap());
            for _ in 0..100 {
                assert!(b.delay(retry, None, &mut rng) <= ceiling);
            }
        }
        assert_eq!(b.ceiling(0), Duration::from_millis(500));
        assert_eq!(b.ceiling(2), Duration::from_secs(2));
        assert_eq!(b.ceiling(10), Duration::from_secs(8));
    }

    #[test]
    fn hints_are_honoured_and_jittered_upwards_only() {
        let b = Backoff::default();
        let mut rng = fastrand::Rng::with_seed(1);
        let hint = Duration::from_secs(6);
        let delays: Vec<_> = (0..50).map(|_| b.delay(0, Some(hint), &mut rng)).collect();
        assert!(delays.iter().all(|d| *d >= hint && *d <= hint.mul_f64(1.1)));
        // Not all in lockstep.
        assert!(delays.iter().any(|d| *d != delays[0]));
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let b = Backoff::default();
        let a: Vec<_> = {
            let mut rng = fastrand::Rng::with_seed(42);
            (0..5).map(|r| b.delay(r, None, &mut rng)).collect()
        };
        let c: Vec<_> = {
            let mut rng = fastrand::Rng::with_seed(42);
            (0..5).map(|r| b.delay(r, None, &mut rng)).collect()
        };
        assert_eq!(a, c);
    }

    #[test]
    fn bad_configuration_names_the_field() {
        let err = Backoff::new(Duration::ZERO, Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.field(), "backoff.base");
        let err = Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.field(), "backoff.cap");
        let err = Backoff::default().with_hint_jitter(2.0).unwrap_err();
        assert_eq!(err.field(), "backoff.hint_jitter");
    }
}
