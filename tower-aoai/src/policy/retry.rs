//! The per-call retry state machine.
//!
//! [`RetryPolicy::start`] opens a call (and deposits in the [`RetryBudget`]); after each attempt,
//! [`RetryPolicy::on_attempt`] takes the attempt's [`Classification`] and answers with an
//! [`Action`]: return the response, retry after a delay, or give up. The caller carries the action
//! out (a tower future sleeps on tokio's timer, a Python transport on `time.sleep` or
//! `asyncio.sleep`). Giving up is always an answer, never a hang: the last real response (or
//! transport error) goes back to the caller.

use std::fmt;
use std::time::{Duration, Instant};

use super::classify::{Classification, Outcome};
use super::hints::HintSource;
use super::{Backoff, ConfigError, RetryBudget};

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Hand the response (or error) to the caller: it succeeded, or retrying cannot help.
    Return,
    /// Wait `after`, then send the request again.
    Retry {
        /// How long to wait before the next attempt.
        after: Duration,
        /// Where the delay came from, when the server gave one.
        hint: Option<HintSource>,
    },
    /// The attempt failed in a retryable way, but no more attempts will be made. The caller returns
    /// the last response marked `x-should-retry: false` (or the last transport error).
    GiveUp(GiveUpReason),
}

/// Why a retryable failure was not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GiveUpReason {
    /// `max_attempts` attempts were made.
    AttemptsExhausted,
    /// The wait would end after the call's deadline.
    DeadlineExceeded,
    /// The server asked for a wait longer than `max_wait`.
    HintTooLong,
    /// The retry budget is spent: the backend is failing for many calls at once.
    BudgetExhausted,
}

impl GiveUpReason {
    /// A short stable name, for logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUpReason::AttemptsExhausted => "attempts_exhausted",
            GiveUpReason::DeadlineExceeded => "deadline_exceeded",
            GiveUpReason::HintTooLong => "hint_too_long",
            GiveUpReason::BudgetExhausted => "budget_exhausted",
        }
    }
}

impl fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GiveUpReason::AttemptsExhausted => "all attempts were used",
            GiveUpReason::DeadlineExceeded => "the next wait would pass the call's deadline",
            GiveUpReason::HintTooLong => "the server asked for a wait longer than max_wait",
            GiveUpReason::BudgetExhausted => "the retry budget is spent",
        })
    }
}

/// How a call is retried: attempts, deadline, longest single wait, and the backoff curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    deadline: Option<Duration>,
    max_wait: Duration,
    backoff: Backoff,
}

impl Default for RetryPolicy {
    /// 5 attempts, a 120 s deadline per call, waits of at most 60 s, [`Backoff::default`].
    fn default() -> Self {
        Self {
            max_attempts: 5,
            deadline: Some(Duration::from_secs(120)),
            max_wait: Duration::from_secs(60),
            backoff: Backoff::default(),
        }
    }
}

impl RetryPolicy {
    /// The default policy; adjust it with the `with_*` methods.
    pub fn new() -> Self {
        Self::default()
    }

    /// Total attempts per call, the first included (1 disables retries).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Result<Self, ConfigError> {
        self.max_attempts = crate::policy::error::check_attempts("max_attempts", max_attempts)?;
        Ok(self)
    }

    /// The longest a call may take, waits included (`None`: only the caller's own deadline).
    pub fn with_deadline(mut self, deadline: Option<Duration>) -> Result<Self, ConfigError> {
        if deadline.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new("deadline", "must be greater than zero"));
        }
        self.deadline = deadline;
        Ok(self)
    }

    /// The longest single wait; a server hint longer than this ends the retries.
    pub fn with_max_wait(mut self, max_wait: Duration) -> Result<Self, ConfigError> {
        if max_wait.is_zero() {
            return Err(ConfigError::new("max_wait", "must be greater than zero"));
        }
        self.max_wait = max_wait;
        Ok(self)
    }

    /// The backoff used when the server gives no hint.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Total attempts per call.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The per-call deadline.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The longest single wait.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// The backoff curve.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// Opens a call at `now`. `caller_deadline` is the caller's own deadline, if it has one; the
    /// earlier of it and the policy's deadline applies. Deposits one unit in `budget`.
    pub fn start(
        &self,
        now: Instant,
        caller_deadline: Option<Instant>,
        budget: &mut RetryBudget,
    ) -> CallState {
        budget.deposit(now);
        let own = self.deadline.and_then(|d| now.checked_add(d));
        let deadline = match (own, caller_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        CallState {
            attempts: 0,
            deadline,
            last: None,
        }
    }

    /// Decides what follows an attempt whose outcome is `class`.
    pub fn on_attempt(
        &self,
        call: &mut CallState,
        class: &Classification,
        now: Instant,
        budget: &mut RetryBudget,
        rng: &mut fastrand::Rng,
    ) -> Action {
        call.attempts = call.attempts.saturating_add(1);
        call.last = Some(class.outcome);
        if class.outcome == Outcome::Success || !class.retryable {
            return Action::Return;
        }
        if call.attempts >= self.max_attempts {
            return Action::GiveUp(GiveUpReason::AttemptsExhausted);
        }
        let hint = class.hint;
        if hint.is_some_and(|h| h.delay > self.max_wait) {
            return Action::GiveUp(GiveUpReason::HintTooLong);
        }
        let after = self
            .backoff
            .delay(call.attempts - 1, hint.map(|h| h.delay), rng)
            .min(self.max_wait);
        if call
            .deadline
            .is_some_and(|deadline| now.checked_add(after).is_none_or(|at| at > deadline))
        {
            return Action::GiveUp(GiveUpReason::DeadlineExceeded);
        }
        if !budget.try_withdraw(now) {
            return Action::GiveUp(GiveUpReason::BudgetExhausted);
        }
        Action::Retry {
            after,
            hint: hint.map(|h| h.source),
        }
    }
}

/// One call's progress through its attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallState {
    attempts: u32,
    deadline: Option<Instant>,
    last: Option<Outcome>,
}

impl CallState {
    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The call's deadline, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left before the deadline (`None`: no deadline).
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(now))
    }

    /// The last attempt's outcome.
    pub fn last_outcome(&self) -> Option<Outcome> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::classify::{ThrottleCause, TransientKind, TransportError, classify_error};
    use crate::policy::{DelayHint, HintSource};

    fn throttle(hint: Option<Duration>) -> Classification {
        Classification {
            outcome: Outcome::Throttled(ThrottleCause::Quota),
            retryable: true,
            hint: hint.map(|delay| DelayHint {
                delay,
                source: HintSource::RetryAfterMs,
            }),
        }
    }

    fn success() -> Classification {
        Classification {
            outcome: Outcome::Success,
            retryable: false,
            hint: None,
        }
    }

    #[test]
    fn retries_with_the_hint_then_returns_success() {
        let policy = RetryPolicy::default();
        let mut budget = RetryBudget::default();
        let mut rng = fastrand::Rng::with_seed(3);
        let t0 = Instant::now();
        let mut call = policy.start(t0, None, &mut budget);
        let action = policy.on_attempt(
            &mut call,
            &throttle(Some(Duration::from_secs(2))),
            t0,
            &mut budget,
            &mut rng,
        );
        let Action::Retry { after, hint } = action else {
            panic!("expected a retry, got {action:?}");
        };
        assert!(after >= Duration::from_secs(2) && after <= Duration::from_millis(2200));
        assert_eq!(hint, Some(HintSource::RetryAfterMs));
        assert_eq!(
            policy.on_attempt(&mut call, &success(), t0 + after, &mut budget, &mut rng),
            Action::Return
        );
        assert_eq!(call.attempts(), 2);
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let policy = RetryPolicy::default().with_max_attempts(3).unwrap();
        let mut budget = RetryBudget::default();
        let mut rng = fastrand::Rng::with_seed(3);
        let t0 = Instant::now();
        let mut call = policy.start(t0, None, &mut budget);
        let err = classify_error(TransportError::Connect);
        assert!(matches!(
            policy.on_attempt(&mut call, &err, t0, &mut budget, &mut rng),
            Action::Retry { .. }
        ));
        assert!(matches!(
            policy.on_attempt(&mut call, &err, t0, &mut budget, &mut rng),
            Action::Retry { .. }
        ));
        assert_eq!(
            policy.on_attempt(&mut call, &err, t0, &mut budget, &mut rng),
            Action::GiveUp(GiveUpReason::AttemptsExhausted)
        );
        assert_eq!(
            call.last_outcome(),
            Some(Outcome::Transient(TransientKind::Connect))
        );
    }

    #[test]
    fn a_hint_past_the_deadline_ends_retries_at_once() {
        let policy = RetryPolicy::default();
        let mut budget = RetryBudget::default();
        let mut rng = fastrand::Rng::with_seed(3);
        let t0 = Instant::now();
        let mut call = policy.start(t0, Some(t0 + Duration::from_secs(5)), &mut budget);
        assert_eq!(
            policy.on_attempt(
                &mut call,
                &throttle(Some(Duration::from_secs(6))),
                t0,
                &mut budget,
                &mut rng
            ),
            Action::GiveUp(GiveUpReason::DeadlineExceeded)
        );
    }

    #[test]
    fn a_daily_quota_hint_is_too_long() {
        let policy = RetryPolicy::default();
        let mut budget = RetryBudget::default();
        let mut rng = fastrand::Rng::with_seed(3);
        let t0 = Instant::now();
        let mut call = policy.start(t0, None, &mut budget);
        assert_eq!(
            policy.on_attempt(
                &mut call,
                &throttle(Some(Duration::from_secs(86_400))),
                t0,
                &mut budget,
                &mut rng
            ),
            Action::GiveUp(GiveUpReason::HintTooLong)
        );
    }

    #[test]
    fn a_spent_budget_stops_retries() {
        let policy = RetryPolicy::default();
        let mut budget = RetryBudget::new(Duration::from_secs(10), 0, 0.0).unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        let t0 = Instant::now();
        let mut call = policy.start(t0, None, &mut budget);
        assert_eq!(
            policy.on_attempt(&mut call, &throttle(None), t0, &mut budget, &mut rng),
            Action::GiveUp(GiveUpReason::BudgetExhausted)
        );
    }

    #[test]
    fn not_retryable_returns() {
        let policy = RetryPolicy::default();
        let mut budget = RetryBudget::default();
        let mut rng = fastrand::Rng::with_seed(3);
        let t0 = Instant::now();
        let mut call = policy.start(t0, None, &mut budget);
        let blocked = Classification {
            outcome: Outcome::Blocked,
            retryable: false,
            hint: None,
        };
        assert_eq!(
            policy.on_attempt(&mut call, &blocked, t0, &mut budget, &mut rng),
            Action::Return
        );
    }

    #[test]
    fn bad_configuration_names_the_field() {
        assert_eq!(
            RetryPolicy::new().with_max_attempts(0).unwrap_err().field(),
            "max_attempts"
        );
        assert_eq!(
            RetryPolicy::new()
                .with_deadline(Some(Duration::ZERO))
                .unwrap_err()
                .field(),
            "deadline"
        );
        assert_eq!(
            RetryPolicy::new()
                .with_max_wait(Duration::ZERO)
                .unwrap_err()
                .field(),
            "max_wait"
        );
    }
}
