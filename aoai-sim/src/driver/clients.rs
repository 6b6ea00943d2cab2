//! Client bookkeeping and the baseline clients.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use tower_aoai::policy::classify::Outcome;
use tower_aoai::policy::hints::{parse_retry_after, parse_retry_after_ms};
use tower_aoai::policy::{Action, CallState, RetryBudget, RetryPolicy};

use super::{Attempt, AttemptId, Call, CallId, Client, ClientPoll, Done};
use crate::model::SimResponse;

/// The bookkeeping most clients need: attempts to send now, attempts delayed to a later time,
/// calls that are over. [`Outbox::poll`] turns it into a [`ClientPoll`].
#[derive(Debug, Default)]
pub struct Outbox {
    next_attempt: AttemptId,
    ready: Vec<Attempt>,
    delayed: BinaryHeap<Reverse<(Duration, CallId, usize)>>,
    finished: Vec<(CallId, Outcome)>,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    fn attempt_id(&mut self) -> AttemptId {
        self.next_attempt += 1;
        self.next_attempt
    }

    /// Sends an attempt of `call` to `target` at the next poll; returns its id.
    pub fn send(&mut self, call: CallId, target: usize) -> AttemptId {
        let attempt = self.attempt_id();
        self.ready.push(Attempt {
            call,
            attempt,
            target,
        });
        attempt
    }

    /// Sends an attempt of `call` to `target` at `at` (the first poll at or after it).
    pub fn send_at(&mut self, at: Duration, call: CallId, target: usize) {
        self.delayed.push(Reverse((at, call, target)));
    }

    /// Ends `call` with `outcome`.
    pub fn finish(&mut self, call: CallId, outcome: Outcome) {
        self.finished.push((call, outcome));
    }

    /// Attempts waiting for a later time.
    pub fn delayed(&self) -> usize {
        self.delayed.len()
    }

    /// Everything due at `now`, and the time of the next delayed attempt.
    pub fn poll(&mut self, now: Duration) -> ClientPoll {
        while let Some(&Reverse((at, call, target))) = self.delayed.peek() {
            if at > now {
                break;
            }
            self.delayed.pop();
            self.send(call, target);
        }
        ClientPoll {
            sends: std::mem::take(&mut self.ready),
            finished: std::mem::take(&mut self.finished),
            wake_at: self.delayed.peek().map(|Reverse((at, _, _))| *at),
        }
    }
}

/// The `openai` Python SDK's behaviour: send at once to the first target, retry 408, 409, 429,
/// 5xx and connection errors twice, waiting `retry-after-ms` (else `retry-after`) when it is in
/// (0, 120 s], else `min(0.5 * 2^n, 8) * (1 - 0.25 * random)` seconds; a hint over 120 s means no
/// retry. `x-should-retry` overrides. No concurrency control, no failover.
#[derive(Debug)]
pub struct NaiveClient {
    outbox: Outbox,
    rng: fastrand::Rng,
    max_retries: u32,
    retries: HashMap<CallId, u32>,
}

impl NaiveClient {
    /// The SDK default (`max_retries = 2`), jitter seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self::with_max_retries(seed, 2)
    }

    /// With another `max_retries`.
    pub fn with_max_retries(seed: u64, max_retries: u32) -> Self {
        Self {
            outbox: Outbox::new(),
            rng: fastrand::Rng::with_seed(seed),
            max_retries,
            retries: HashMap::new(),
        }
    }

    /// The SDK's delay before retry `n` (0-based), or `None` when it will not retry.
    fn delay(&mut self, response: &SimResponse, n: u32) -> Option<Duration> {
        if let SimResponse::Answer(a) = response {
            let hint = a
                .headers
                .get("retry-after-ms")
                .and_then(|v| parse_retry_after_ms(v.as_bytes()))
                .or_else(|| {
                    a.headers
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| parse_retry_after(v.as_bytes(), SystemTime::UNIX_EPOCH))
                });
            match hint {
                Some(d) if d > Duration::from_secs(120) => return None,
                Some(d) => return Some(d),
                None => {}
            }
        }
        let base = (0.5 * 2f64.powi(n.min(30) as i32)).min(8.0);
        Some(Duration::from_secs_f64(
            base * (1.0 - 0.25 * self.rng.f64()),
        ))
    }
}

fn sdk_retries(response: &SimResponse) -> bool {
    match response {
        SimResponse::Answer(a) => {
            match a.headers.get("x-should-retry").map(|v| v.as_bytes()) {
                Some(b"true") => return true,
                Some(b"false") => return false,
                _ => {}
            }
            let s = a.status;
            s == StatusCode::REQUEST_TIMEOUT
                || s == StatusCode::CONFLICT
                || s == StatusCode::TOO_MANY_REQUESTS
                || s.is_server_error()
        }
        SimResponse::Refused => true,
        SimResponse::Reset { after_chunks, .. } => *after_chunks == 0,
    }
}

impl Client for NaiveClient {
    fn on_arrival(&mut self, _now: Duration, call: &Call) {
        self.retries.insert(call.id, 0);
        self.outbox.send(call.id, 0);
    }

    fn on_response(&mut self, now: Duration, done: &Done<'_>) {
        let call = done.attempt.call;
        let class = done.classify();
        if class.outcome == Outcome::Success && !done.broke_mid_stream() {
            self.retries.remove(&call);
            self.outbox.finish(call, Outcome::Success);
            return;
        }
        let n = self.retries.get(&call).copied().unwrap_or(0);
        if n < self.max_retries
            && sdk_retries(done.response)
            && let Some(delay) = self.delay(done.response, n)
        {
            self.retries.insert(call, n + 1);
            self.outbox
                .send_at(now.saturating_add(delay), call, done.attempt.target);
            return;
        }
        self.retries.remove(&call);
        let outcome = if class.outcome == Outcome::Success {
            Outcome::Transient(tower_aoai::policy::TransientKind::Connect)
        } else {
            class.outcome
        };
        self.outbox.finish(call, outcome);
    }

    fn poll(&mut self, now: Duration) -> ClientPoll {
        self.outbox.poll(now)
    }
}

/// tower-aoai's retry core ([`RetryPolicy`] + [`RetryBudget`] + the classifier), sending every
/// attempt to the first target: what `RetryLayer` does, in virtual time.
#[derive(Debug)]
pub struct RetryClient {
    outbox: Outbox,
    rng: fastrand::Rng,
    policy: RetryPolicy,
    budget: RetryBudget,
    epoch: Instant,
    calls: HashMap<CallId, CallState>,
}

impl RetryClient {
    /// With the default policy and budget.
    pub fn new(seed: u64) -> Self {
        Self::with_policy(seed, RetryPolicy::default(), RetryBudget::default())
    }

    /// With an explicit policy and budget.
    pub fn with_policy(seed: u64, policy: RetryPolicy, budget: RetryBudget) -> Self {
        Self {
            outbox: Outbox::new(),
            rng: fastrand::Rng::with_seed(seed),
            policy,
            budget,
            // The core takes `Instant`s: virtual time is mapped onto an arbitrary epoch.
            epoch: Instant::now(),
            calls: HashMap::new(),
        }
    }

    fn instant(&self, now: Duration) -> Instant {
        self.epoch + now
    }
}

impl Client for RetryClient {
    fn on_arrival(&mut self, now: Duration, call: &Call) {
        let state = self.policy.start(self.instant(now), None, &mut self.budget);
        self.calls.insert(call.id, state);
        self.outbox.send(call.id, 0);
    }

    fn on_response(&mut self, now: Duration, done: &Done<'_>) {
        let call = done.attempt.call;
        let Some(mut state) = self.calls.remove(&call) else {
            return;
        };
        let class = done.classify();
        if done.broke_mid_stream() {
            self.outbox.finish(
                call,
                Outcome::Transient(tower_aoai::policy::TransientKind::Connect),
            );
            return;
        }
        let at = self.instant(now);
        match self
            .policy
            .on_attempt(&mut state, &class, at, &mut self.budget, &mut self.rng)
        {
            Action::Retry { after, .. } => {
                self.calls.insert(call, state);
                self.outbox
                    .send_at(now.saturating_add(after), call, done.attempt.target);
            }
            _ => self.outbox.finish(call, class.outcome),
        }
    }

    fn poll(&mut self, now: Duration) -> ClientPoll {
        self.outbox.poll(now)
    }
}
