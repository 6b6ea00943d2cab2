//! Request and token pacing of one backend (GCRA), and the server's "wait" held for everyone.
//!
//! Azure checks a deployment's requests-per-minute quota over short windows (1 s or 10 s): a
//! 600 RPM deployment answers 429 to the eleventh request in one second, however idle the rest of
//! the minute was. A concurrency limit cannot see that (ten fast calls finish and ten more leave at
//! once), so attempts are also *spaced*: [`Pacer`] runs the generic cell rate algorithm (GCRA, the
//! algorithm of redis-cell's `CL.THROTTLE`) on requests and on estimated tokens
//! ([`TokenEstimator`](super::TokenEstimator)).
//!
//! - Rates come from configuration (known RPM/TPM) or are learned from `x-ratelimit-limit-requests`
//!   / `x-ratelimit-limit-tokens`; configured values win. Azure may report the request figure per
//!   10 s (or per its tightest window) rather than per minute: by default ([`LimitWindow::Auto`])
//!   the window is inferred from how `x-ratelimit-remaining-requests` tracks this pacer's own
//!   sends ([`Pacer::on_response_to`]). A `safety` factor (default 0.97) paces a
//!   little under the quota, so the jitter between the client's clock and the service's windows
//!   does not trip it.
//! - With the default burst of one request, sends are spaced by at least `60 s / (RPM * safety)`,
//!   so a 600 RPM budget never sends 11 requests in any 1 s window, nor more than 600 in any
//!   minute. Tokens are spaced the same way, by each request's estimate (a request may run the
//!   token bucket into debt, up to one minute's quota, so no request is ever refused forever).
//! - `x-ratelimit-remaining-requests: 0` holds requests until `x-ratelimit-reset-requests`;
//!   `x-ratelimit-remaining-tokens` below a request's estimate holds it until enough has refilled.
//! - [`Pacer::hold`]: a throttle's `retry-after` holds every send to the backend, not only the
//!   retried call, so the callers that did not see the 429 do not walk into the next one.
//!
//! [`Pacer::check`] answers `Ok(())` (and records the send) or `Err(wait)`: the caller sleeps for
//! `wait` and asks again. Every wait is bounded (`max_hold`, default 60 s), whatever the headers say.

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};

use super::ConfigError;
use super::classify::{Outcome, ThrottleCause};
use super::headers::{RateLimitHeaders, rate_limit_count};
use super::hints;

/// The most one request may charge the token bucket, as a share of a minute's quota: a request
/// whose estimate exceeds the whole quota is charged one minute, so it delays later sends by at
/// most a minute instead of forever.
const MAX_CHARGE: Duration = Duration::from_secs(60);

/// The generic cell rate algorithm: one "theoretical arrival time" per stream of sends.
///
/// A send of cost `c` is allowed when the theoretical arrival time is at most `tolerance` in the
/// future; it then moves that time by `c` emission intervals. Over any window of length `W`, the
/// cost sent is at most `W / interval + tolerance / interval` plus the cost of one send.
#[derive(Debug, Clone, PartialEq)]
pub struct Gcra {
    /// Nanoseconds per unit of cost (rounded up when charged, so the rate is never exceeded).
    interval_ns: f64,
    tolerance: Duration,
    tat: Option<Instant>,
}

impl Gcra {
    /// A GCRA allowing `per_second` units of cost per second, with a burst tolerance.
    pub fn new(per_second: f64, tolerance: Duration) -> Result<Self, ConfigError> {
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(ConfigError::new(
                "pacing.rate",
                format!("must be a positive number, got {per_second}"),
            ));
        }
        Ok(Self {
            interval_ns: 1e9 / per_second,
            tolerance,
            tat: None,
        })
    }

    /// Units of cost per second.
    pub fn per_second(&self) -> f64 {
        1e9 / self.interval_ns
    }

    /// The time between two sends of cost 1 (rounded up to the nanosecond).
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns.ceil() as u64)
    }

    /// The burst tolerance.
    pub fn tolerance(&self) -> Duration {
        self.tolerance
    }

    /// How long until a send is allowed at `now` (zero: now).
    pub fn wait(&self, now: Instant) -> Duration {
        match self.tat {
            Some(tat) => tat
                .saturating_duration_since(now)
                .saturating_sub(self.tolerance),
            None => Duration::ZERO,
        }
    }

    /// Records a send of `cost` at `now` (call after [`wait`](Self::wait) said zero). The charge
    /// is at most one minute of emission time.
    pub fn charge(&mut self, now: Instant, cost: f64) {
        let nanos = (cost.max(0.0) * self.interval_ns)
            .ceil()
            .min(MAX_CHARGE.as_nanos() as f64) as u64;
        let start = self.tat.map_or(now, |tat| tat.max(now));
        self.tat = Some(start + Duration::from_nanos(nanos));
    }

    /// Changes the rate, keeping the schedule already charged.
    fn set_rate(&mut self, per_second: f64, tolerance: Duration) {
        self.interval_ns = 1e9 / per_second;
        self.tolerance = tolerance;
    }
}

/// What a `x-ratelimit-limit-requests` value counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitWindow {
    /// Inferred from the responses: the window (1 s, 10 s or 60 s) under which
    /// `x-ratelimit-remaining-requests` best matches this pacer's own recent sends. Until the
    /// evidence says otherwise, 10 s (the window Azure is reported to count in).
    Auto,
    /// Requests per second.
    Second,
    /// Requests per 10 s (what some Azure deployments have been reported to send).
    TenSeconds,
    /// Requests per minute (OpenAI's meaning).
    Minute,
}

impl LimitWindow {
    fn length(self) -> Option<Duration> {
        match self {
            LimitWindow::Auto => None,
            LimitWindow::Second => Some(Duration::from_secs(1)),
            LimitWindow::TenSeconds => Some(Duration::from_secs(10)),
            LimitWindow::Minute => Some(Duration::from_secs(60)),
        }
    }
}

/// The windows [`LimitWindow::Auto`] chooses among, in order of preference on a tie.
const CANDIDATE_WINDOWS: [Duration; 3] = [
    Duration::from_secs(10),
    Duration::from_secs(60),
    Duration::from_secs(1),
];

/// Sends remembered for window inference (the longest candidate window's worth, at most this many).
const MAX_REMEMBERED_SENDS: usize = 65_536;

/// Infers which window `x-ratelimit-limit-requests` counts: under the true window `W`, a response
/// to a request sent at `s` reports `remaining = limit - (sends in (s - W, s])` when this client is
/// the only one sending; the candidate whose prediction errs least (smoothed) wins. Other clients
/// on the same deployment lower `remaining`, which favours longer windows: a slower, safe pace.
#[derive(Debug, Clone, Default)]
struct WindowGuess {
    sends: std::collections::VecDeque<Instant>,
    errors: [f64; 3],
}

impl WindowGuess {
    fn record(&mut self, at: Instant) {
        let horizon = CANDIDATE_WINDOWS[1];
        while self
            .sends
            .front()
            .is_some_and(|&t| t + horizon < at || self.sends.len() >= MAX_REMEMBERED_SENDS)
        {
            self.sends.pop_front();
        }
        if self.sends.back().is_none_or(|&t| t <= at) {
            self.sends.push_back(at);
        }
    }

    fn sends_in(&self, sent_at: Instant, window: Duration) -> f64 {
        let end = self.sends.partition_point(|&t| t <= sent_at);
        let start = self.sends.partition_point(|&t| t + window <= sent_at);
        end.saturating_sub(start) as f64
    }

    fn observe(&mut self, sent_at: Instant, limit: f64, remaining: f64) {
        for (i, window) in CANDIDATE_WINDOWS.iter().enumerate() {
            let predicted = limit - self.sends_in(sent_at, *window);
            self.errors[i] = self.errors[i] * 0.75 + (remaining - predicted).abs();
        }
    }

    fn best(&self) -> Duration {
        let mut best = 0;
        for i in 1..CANDIDATE_WINDOWS.len() {
            if self.errors[i] < self.errors[best] {
                best = i;
            }
        }
        CANDIDATE_WINDOWS[best]
    }
}

/// The settings of a [`Pacer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PacingConfig {
    requests_per_minute: Option<f64>,
    tokens_per_minute: Option<f64>,
    request_burst: u32,
    token_burst: u64,
    safety: f64,
    learn: bool,
    limit_window: LimitWindow,
    max_hold: Duration,
}

impl Default for PacingConfig {
    /// No known rates (learned from headers, the request window inferred), a burst of one request
    /// and no token burst, paced at 97 % of the quota, holds of at most 60 s.
    fn default() -> Self {
        Self {
            requests_per_minute: None,
            tokens_per_minute: None,
            request_burst: 1,
            token_burst: 0,
            safety: 0.97,
            learn: true,
            limit_window: LimitWindow::Auto,
            max_hold: Duration::from_secs(60),
        }
    }
}

impl PacingConfig {
    /// The default settings; adjust them with the `with_*` methods.
    pub fn new() -> Self {
        Self::default()
    }

    /// The deployment's requests-per-minute quota, when known.
    pub fn with_requests_per_minute(mut self, rpm: Option<f64>) -> Self {
        self.requests_per_minute = rpm;
        self
    }

    /// The deployment's tokens-per-minute quota, when known.
    pub fn with_tokens_per_minute(mut self, tpm: Option<f64>) -> Self {
        self.tokens_per_minute = tpm;
        self
    }

    /// How many requests may leave back to back (1: always spaced). Over any 1 s window a burst
    /// of `b` allows `b - 1` more requests than the rate.
    pub fn with_request_burst(mut self, burst: u32) -> Self {
        self.request_burst = burst;
        self
    }

    /// How many tokens may leave ahead of the token rate.
    pub fn with_token_burst(mut self, tokens: u64) -> Self {
        self.token_burst = tokens;
        self
    }

    /// The share of the quota actually used (0 < safety <= 1).
    pub fn with_safety(mut self, safety: f64) -> Self {
        self.safety = safety;
        self
    }

    /// Whether rates are learned from `x-ratelimit-limit-*` headers when not configured.
    pub fn with_learning(mut self, learn: bool) -> Self {
        self.learn = learn;
        self
    }

    /// What `x-ratelimit-limit-requests` counts.
    pub fn with_limit_window(mut self, window: LimitWindow) -> Self {
        self.limit_window = window;
        self
    }

    /// The longest any single hold may last.
    pub fn with_max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = max_hold;
        self
    }

    /// The configured requests-per-minute quota.
    pub fn requests_per_minute(&self) -> Option<f64> {
        self.requests_per_minute
    }

    /// The configured tokens-per-minute quota.
    pub fn tokens_per_minute(&self) -> Option<f64> {
        self.tokens_per_minute
    }

    /// The share of the quota actually used.
    pub fn safety(&self) -> f64 {
        self.safety
    }

    /// The longest any single hold may last.
    pub fn max_hold(&self) -> Duration {
        self.max_hold
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("pacing.requests_per_minute", self.requests_per_minute),
            ("pacing.tokens_per_minute", self.tokens_per_minute),
        ] {
            if let Some(v) = value
                && !(v.is_finite() && v > 0.0)
            {
                return Err(ConfigError::new(
                    field,
                    format!("must be a positive number, got {v}"),
                ));
            }
        }
        if self.request_burst == 0 {
            return Err(ConfigError::new(
                "pacing.request_burst",
                "must be at least 1",
            ));
        }
        if !(self.safety > 0.0 && self.safety <= 1.0) {
            return Err(ConfigError::new(
                "pacing.safety",
                format!("must be in (0, 1], got {}", self.safety),
            ));
        }
        if self.max_hold.is_zero() || self.max_hold > hints::MAX_HINT {
            return Err(ConfigError::new(
                "pacing.max_hold",
                format!("must be between 0 and 7 days, got {:?}", self.max_hold),
            ));
        }
        Ok(())
    }
}

/// A server snapshot of what remains of a quota window.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Remaining {
    /// What remains, minus what was sent since the snapshot.
    left: f64,
    observed_at: Instant,
    /// When the snapshot stops meaning anything (the window reset).
    expires_at: Instant,
}

/// Paces the sends to one backend. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Pacer {
    config: PacingConfig,
    requests: Option<Gcra>,
    tokens: Option<Gcra>,
    learned_rpm: Option<f64>,
    learned_tpm: Option<f64>,
    window_guess: WindowGuess,
    hold_until: Option<Instant>,
    remaining_requests: Option<Remaining>,
    remaining_tokens: Option<Remaining>,
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new(PacingConfig::default()).expect("the default pacing configuration is valid")
    }
}

impl Pacer {
    /// A pacer with `config`; a setting out of range is an error naming it.
    pub fn new(config: PacingConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut pacer = Self {
            config,
            requests: None,
            tokens: None,
            learned_rpm: None,
            learned_tpm: None,
            window_guess: WindowGuess::default(),
            hold_until: None,
            remaining_requests: None,
            remaining_tokens: None,
        };
        pacer.apply_rates();
        Ok(pacer)
    }

    /// The settings.
    pub fn config(&self) -> &PacingConfig {
        &self.config
    }

    /// The requests-per-minute quota paced against (configured, else learned), before `safety`.
    pub fn requests_per_minute(&self) -> Option<f64> {
        self.config.requests_per_minute.or(self.learned_rpm)
    }

    /// The tokens-per-minute quota paced against (configured, else learned), before `safety`.
    pub fn tokens_per_minute(&self) -> Option<f64> {
        self.config.tokens_per_minute.or(self.learned_tpm)
    }

    /// The window `x-ratelimit-limit-requests` is read in: the configured one, or the inferred
    /// one with [`LimitWindow::Auto`].
    pub fn request_window(&self) -> Duration {
        self.config
            .limit_window
            .length()
            .unwrap_or_else(|| self.window_guess.best())
    }

    /// The request GCRA, when a request rate is known.
    pub fn request_gcra(&self) -> Option<&Gcra> {
        self.requests.as_ref()
    }

    /// The token GCRA, when a token rate is known.
    pub fn token_gcra(&self) -> Option<&Gcra> {
        self.tokens.as_ref()
    }

    /// Until when every send is held (a server hint), if it is.
    pub fn held_until(&self, now: Instant) -> Option<Instant> {
        self.hold_until.filter(|&h| h > now)
    }

    /// How long a send of `tokens` estimated tokens must wait at `now` (zero: it may go now).
    /// Records nothing.
    pub fn wait(&self, now: Instant, tokens: u64) -> Duration {
        let mut wait = self
            .hold_until
            .map_or(Duration::ZERO, |h| h.saturating_duration_since(now));
        if let Some(g) = &self.requests {
            wait = wait.max(g.wait(now));
        }
        if let Some(g) = &self.tokens {
            wait = wait.max(g.wait(now));
        }
        // Once the request rate is known, its spacing is the authority: at that pace `remaining`
        // reads 0 at the end of every window, which is the limit, not past it.
        if let Some(r) = self.remaining_requests
            && self.requests.is_none()
            && now < r.expires_at
            && r.left < 1.0
        {
            wait = wait.max(r.expires_at - now);
        }
        if let Some(r) = self.remaining_tokens
            && now < r.expires_at
        {
            wait = wait.max(self.token_refill_wait(r, now, tokens as f64));
        }
        wait.min(self.config.max_hold)
    }

    /// Asks to send `tokens` estimated tokens at `now`: `Ok(())` records the send; `Err(wait)` says
    /// how long to wait before asking again (never zero, never more than `max_hold`).
    pub fn check(&mut self, now: Instant, tokens: u64) -> Result<(), Duration> {
        let wait = self.wait(now, tokens);
        if !wait.is_zero() {
            return Err(wait);
        }
        self.hold_until = None;
        if let Some(g) = &mut self.requests {
            g.charge(now, 1.0);
        }
        if let Some(g) = &mut self.tokens {
            g.charge(now, tokens as f64);
        }
        if self.config.learn && self.config.limit_window == LimitWindow::Auto {
            self.window_guess.record(now);
        }
        for (remaining, cost) in [
            (&mut self.remaining_requests, 1.0),
            (&mut self.remaining_tokens, tokens as f64),
        ] {
            if let Some(r) = remaining {
                r.left -= cost;
            }
        }
        Ok(())
    }

    /// Applies a throttle's delay hint: for a quota, provisioned or unexplained throttle every send
    /// waits (the hint is the time until the shared window or bucket has room, and the calls that
    /// did not see the 429 would walk into the next one); for a regional capacity throttle or a
    /// 503, nothing is held (that overload follows concurrency, which the limit's cut already
    /// lowered, and its hint is a generic "retry after N seconds" for that one call). Returns the
    /// end of the hold, if there is one.
    pub fn on_throttle(
        &mut self,
        now: Instant,
        outcome: Outcome,
        hint: Option<Duration>,
    ) -> Option<Instant> {
        let holds_all = matches!(
            outcome,
            Outcome::Throttled(
                ThrottleCause::Quota | ThrottleCause::Provisioned | ThrottleCause::Unknown
            )
        );
        let delay = hint.filter(|_| holds_all)?;
        self.hold(now, delay);
        self.held_until(now)
    }

    /// Holds every send until `now + delay` (at most `max_hold`): the server asked to wait.
    pub fn hold(&mut self, now: Instant, delay: Duration) {
        let until = now + delay.min(self.config.max_hold);
        if self.hold_until.is_none_or(|h| h < until) {
            self.hold_until = Some(until);
        }
    }

    /// Learns from the headers of a response received at `now`, as
    /// [`on_response_to`](Self::on_response_to) with the send time unknown (taken as `now`: window inference then
    /// learns nothing from this response).
    pub fn on_response(&mut self, now: Instant, headers: &HeaderMap) {
        self.learn(now, None, &RateLimitHeaders::find(headers));
    }

    /// Learns from the headers of a response (received at `now`) to a request sent at `sent_at`:
    /// quota limits (`x-ratelimit-limit-*`, when learning is on and no rate was configured) and
    /// what remains of the current window (`x-ratelimit-remaining-*` with
    /// `x-ratelimit-reset-*`). Garbage values are ignored.
    pub fn on_response_to(&mut self, now: Instant, sent_at: Instant, headers: &HeaderMap) {
        self.learn(now, Some(sent_at), &RateLimitHeaders::find(headers));
    }

    /// [`on_response_to`](Self::on_response_to) with the headers already found, for a driver
    /// that reads them once for the pacer and the stats.
    pub fn on_found(&mut self, now: Instant, sent_at: Instant, found: &RateLimitHeaders<'_>) {
        self.learn(now, Some(sent_at), found);
    }

    fn learn(&mut self, now: Instant, sent_at: Option<Instant>, found: &RateLimitHeaders<'_>) {
        if self.config.learn {
            let limit = header_count(found.limit_requests);
            let window = match self.config.limit_window.length() {
                Some(window) => window,
                None => {
                    if let (Some(limit), Some(remaining), Some(sent_at)) = (
                        limit,
                        header_count_or_zero(found.remaining_requests),
                        sent_at,
                    ) {
                        self.window_guess.observe(sent_at, limit, remaining);
                    }
                    self.window_guess.best()
                }
            };
            let rpm = limit.map(|n| n * 60.0 / window.as_secs_f64());
            let tpm = header_count(found.limit_tokens);
            let changed = (rpm.is_some() && rpm != self.learned_rpm)
                || (tpm.is_some() && tpm != self.learned_tpm);
            self.learned_rpm = rpm.or(self.learned_rpm);
            self.learned_tpm = tpm.or(self.learned_tpm);
            if changed {
                self.apply_rates();
            }
        }
        let reset = |values: &[Option<&HeaderValue>]| {
            values
                .iter()
                .flatten()
                .filter_map(|v| hints::parse_reset(v.as_bytes()))
                .max()
        };
        if let Some(left) = header_count_or_zero(found.remaining_requests) {
            // Without a reset time, a window of requests is assumed to free up within a second
            // (the shortest window Azure checks).
            let window = reset(&[found.reset_requests]).unwrap_or(Duration::from_secs(1));
            self.remaining_requests = Some(Remaining {
                left,
                observed_at: now,
                expires_at: now + window.min(self.config.max_hold),
            });
        }
        if let Some(left) = header_count_or_zero(found.remaining_tokens) {
            let window =
                reset(&[found.reset_tokens, found.reset_tokens_azure]).unwrap_or(MAX_CHARGE);
            self.remaining_tokens = Some(Remaining {
                left,
                observed_at: now,
                expires_at: now + window.min(self.config.max_hold),
            });
        }
    }

    /// How long until `cost` tokens are available by the snapshot `r` (refilling at the token
    /// rate when it is known, else at the window's reset).
    fn token_refill_wait(&self, r: Remaining, now: Instant, cost: f64) -> Duration {
        let Some(rate) = self.tokens_per_minute().map(|tpm| tpm / 60.0) else {
            return if cost > r.left {
                r.expires_at - now
            } else {
                Duration::ZERO
            };
        };
        let elapsed = now.saturating_duration_since(r.observed_at).as_secs_f64();
        let available = r.left + rate * elapsed;
        // A request larger than the whole quota waits for a full window at most.
        let need = cost.min(rate * 60.0);
        if need <= available {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64((need - available) / rate)
            .unwrap_or(Duration::MAX)
            .min(r.expires_at - now)
    }

    fn apply_rates(&mut self) {
        let safety = self.config.safety;
        if let Some(rpm) = self.requests_per_minute() {
            let per_second = rpm / 60.0 * safety;
            let tolerance =
                Duration::from_secs_f64(f64::from(self.config.request_burst - 1) / per_second)
                    .min(MAX_CHARGE);
            set_rate(&mut self.requests, per_second, tolerance);
        }
        if let Some(tpm) = self.tokens_per_minute() {
            let per_second = tpm / 60.0 * safety;
            let tolerance = Duration::from_secs_f64(self.config.token_burst as f64 / per_second)
                .min(MAX_CHARGE);
            set_rate(&mut self.tokens, per_second, tolerance);
        }
    }
}

fn set_rate(gcra: &mut Option<Gcra>, per_second: f64, tolerance: Duration) {
    match gcra {
        Some(g) => g.set_rate(per_second, tolerance),
        None => *gcra = Gcra::new(per_second, tolerance).ok(),
    }
}

/// A positive count (a quota limit).
fn header_count(value: Option<&HeaderValue>) -> Option<f64> {
    header_count_or_zero(value).filter(|&n| n > 0.0)
}

/// A count, zero included (a limit or what remains of it).
fn header_count_or_zero(value: Option<&HeaderValue>) -> Option<f64> {
    rate_limit_count(value).map(|n| n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::classify::TransientKind;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    /// Sends as fast as the pacer allows for `span`, returning the send times.
    fn drain(p: &mut Pacer, t0: Instant, span: Duration, tokens: u64) -> Vec<Instant> {
        let mut sent = Vec::new();
        let mut t = t0;
        while t < t0 + span {
            match p.check(t, tokens) {
                Ok(()) => sent.push(t),
                Err(wait) => {
                    assert!(!wait.is_zero());
                    t += wait;
                }
            }
        }
        sent
    }

    fn max_in_window(times: &[Instant], window: Duration) -> usize {
        let mut best = 0;
        for (i, &start) in times.iter().enumerate() {
            let n = times[i..]
                .iter()
                .take_while(|&&t| t < start + window)
                .count();
            best = best.max(n);
        }
        best
    }

    #[test]
    fn six_hundred_rpm_never_sends_eleven_in_a_second() {
        let cfg = PacingConfig::new()
            .with_requests_per_minute(Some(600.0))
            .with_safety(1.0);
        let mut p = Pacer::new(cfg).unwrap();
        let t0 = Instant::now();
        let sent = drain(&mut p, t0, Duration::from_secs(60), 1);
        assert_eq!(max_in_window(&sent, Duration::from_secs(1)), 10);
        assert_eq!(max_in_window(&sent, Duration::from_secs(60)), 600);
        assert_eq!(sent.len(), 600);
    }

    #[test]
    fn the_safety_factor_paces_under_the_quota() {
        let mut p = Pacer::new(PacingConfig::new().with_requests_per_minute(Some(600.0))).unwrap();
        let t0 = Instant::now();
        let sent = drain(&mut p, t0, Duration::from_secs(60), 1);
        assert_eq!(sent.len(), 582);
    }

    #[test]
    fn tokens_are_spaced_by_their_estimate() {
        let cfg = PacingConfig::new()
            .with_tokens_per_minute(Some(60_000.0))
            .with_safety(1.0);
        let mut p = Pacer::new(cfg).unwrap();
        let t0 = Instant::now();
        // 1,000 tokens per request at 1,000 tokens/s: one request per second.
        let sent = drain(&mut p, t0, Duration::from_secs(10), 1000);
        assert_eq!(sent.len(), 10);
        assert_eq!(sent[1] - sent[0], Duration::from_secs(1));
    }

    #[test]
    fn a_huge_request_delays_the_next_by_at_most_a_minute() {
        let cfg = PacingConfig::new().with_tokens_per_minute(Some(1000.0));
        let mut p = Pacer::new(cfg).unwrap();
        let t0 = Instant::now();
        assert_eq!(p.check(t0, 10_000_000), Ok(()));
        assert_eq!(p.check(t0, 1), Err(MAX_CHARGE));
    }

    #[test]
    fn rates_are_learned_from_headers_and_configuration_wins() {
        let mut p = Pacer::new(PacingConfig::new().with_limit_window(LimitWindow::Minute)).unwrap();
        let t0 = Instant::now();
        assert_eq!(p.wait(t0, 1), Duration::ZERO);
        p.on_response_to(
            t0,
            t0,
            &headers(&[
                ("x-ratelimit-limit-requests", "600"),
                ("x-ratelimit-limit-tokens", "100000"),
            ]),
        );
        assert_eq!(p.requests_per_minute(), Some(600.0));
        assert_eq!(p.tokens_per_minute(), Some(100_000.0));
        let sent = drain(&mut p, t0, Duration::from_secs(1), 1);
        assert!(sent.len() <= 10);

        let mut ten =
            Pacer::new(PacingConfig::new().with_limit_window(LimitWindow::TenSeconds)).unwrap();
        ten.on_response_to(t0, t0, &headers(&[("x-ratelimit-limit-requests", "100")]));
        assert_eq!(ten.requests_per_minute(), Some(600.0));

        let mut fixed =
            Pacer::new(PacingConfig::new().with_requests_per_minute(Some(60.0))).unwrap();
        fixed.on_response_to(t0, t0, &headers(&[("x-ratelimit-limit-requests", "6000")]));
        assert_eq!(fixed.requests_per_minute(), Some(60.0));
    }

    /// A server with a sliding request window of `window` admitting `limit`: answers each send
    /// with what remains after it, as Azure and the simulator do.
    fn learn_against(window: Duration, limit: u64) -> Pacer {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        let mut server: Vec<Instant> = Vec::new();
        let mut t = t0;
        for i in 0..200u64 {
            // Irregular sends, as fast as the pacer allows or slower.
            t += Duration::from_millis(50 + (i * 7919) % 400);
            if let Err(wait) = p.check(t, 1) {
                t += wait;
                p.check(t, 1).unwrap();
            }
            server.retain(|&s| s + window > t);
            server.push(t);
            let remaining = limit.saturating_sub(server.len() as u64).to_string();
            let limit = limit.to_string();
            p.on_response_to(
                t + Duration::from_millis(300),
                t,
                &headers(&[
                    ("x-ratelimit-limit-requests", limit.as_str()),
                    ("x-ratelimit-remaining-requests", remaining.as_str()),
                ]),
            );
        }
        p
    }

    #[test]
    fn the_request_window_is_inferred_from_remaining() {
        for (window, limit) in [(1, 10), (10, 100), (60, 600), (10, 20), (1, 3)] {
            let window = Duration::from_secs(window);
            let p = learn_against(window, limit);
            assert_eq!(p.request_window(), window, "limit {limit}");
            assert_eq!(
                p.requests_per_minute(),
                Some(limit as f64 * 60.0 / window.as_secs_f64())
            );
        }
        // With no evidence, 10 s.
        let mut p = Pacer::default();
        let t0 = Instant::now();
        p.on_response_to(t0, t0, &headers(&[("x-ratelimit-limit-requests", "100")]));
        assert_eq!(p.request_window(), Duration::from_secs(10));
        assert_eq!(p.requests_per_minute(), Some(600.0));
    }

    #[test]
    fn no_remaining_requests_holds_until_reset() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        p.on_response_to(
            t0,
            t0,
            &headers(&[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "2s"),
            ]),
        );
        assert_eq!(p.check(t0, 1), Err(Duration::from_secs(2)));
        assert_eq!(p.check(t0 + Duration::from_secs(2), 1), Ok(()));
        // One left: one send, then hold until the window resets.
        p.on_response_to(
            t0,
            t0,
            &headers(&[
                ("x-ratelimit-remaining-requests", "1"),
                ("x-ratelimit-reset-requests", "1s"),
            ]),
        );
        assert_eq!(p.check(t0, 1), Ok(()));
        assert_eq!(p.check(t0, 1), Err(Duration::from_secs(1)));
    }

    #[test]
    fn remaining_tokens_refill_at_the_token_rate() {
        let cfg = PacingConfig::new()
            .with_tokens_per_minute(Some(60_000.0))
            .with_safety(1.0)
            .with_token_burst(1_000_000);
        let mut p = Pacer::new(cfg).unwrap();
        let t0 = Instant::now();
        p.on_response_to(
            t0,
            t0,
            &headers(&[
                ("x-ratelimit-remaining-tokens", "500"),
                ("x-ratelimit-reset-tokens", "30s"),
            ]),
        );
        // 1,500 tokens needed, 500 left, 1,000 tokens/s: one second.
        assert_eq!(p.check(t0, 1500), Err(Duration::from_secs(1)));
        assert_eq!(p.check(t0, 400), Ok(()));
    }

    #[test]
    fn a_server_hold_stops_every_send_and_is_bounded() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        p.hold(t0, Duration::from_secs(20));
        assert_eq!(p.check(t0, 1), Err(Duration::from_secs(20)));
        assert_eq!(
            p.check(t0 + Duration::from_secs(5), 1),
            Err(Duration::from_secs(15))
        );
        // A shorter hint does not shorten a longer hold.
        p.hold(t0, Duration::from_secs(1));
        assert_eq!(p.held_until(t0), Some(t0 + Duration::from_secs(20)));
        assert_eq!(p.check(t0 + Duration::from_secs(20), 1), Ok(()));
        // A daily quota's hint holds for max_hold only.
        p.hold(t0, Duration::from_secs(86_400));
        assert_eq!(p.check(t0, 1), Err(Duration::from_secs(60)));
    }

    #[test]
    fn only_shared_window_throttles_hold_everyone() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        let six = Some(Duration::from_secs(6));
        let capacity = Outcome::Throttled(ThrottleCause::Capacity);
        assert_eq!(p.on_throttle(t0, capacity, six), None);
        let overloaded = Outcome::Transient(TransientKind::Overloaded);
        assert_eq!(p.on_throttle(t0, overloaded, six), None);
        assert_eq!(p.check(t0, 1), Ok(()));
        let quota = Outcome::Throttled(ThrottleCause::Quota);
        assert_eq!(p.on_throttle(t0, quota, None), None);
        assert_eq!(
            p.on_throttle(t0, quota, six),
            Some(t0 + Duration::from_secs(6))
        );
        assert_eq!(p.check(t0, 1), Err(Duration::from_secs(6)));
    }

    #[test]
    fn a_known_rate_overrides_remaining_zero() {
        let cfg = PacingConfig::new()
            .with_requests_per_minute(Some(600.0))
            .with_safety(1.0);
        let mut p = Pacer::new(cfg).unwrap();
        let t0 = Instant::now();
        p.on_response(t0, &headers(&[("x-ratelimit-remaining-requests", "0")]));
        assert_eq!(p.check(t0, 1), Ok(()));
        assert_eq!(p.check(t0, 1), Err(Duration::from_millis(100)));
    }

    #[test]
    fn hostile_headers_are_ignored() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        for bad in [
            "-1",
            "abc",
            "1e9",
            "",
            "99999999999999999999",
            "0x10",
            "1.5",
        ] {
            p.on_response_to(
                t0,
                t0,
                &headers(&[
                    ("x-ratelimit-limit-requests", bad),
                    ("x-ratelimit-limit-tokens", bad),
                    ("x-ratelimit-remaining-requests", bad),
                    ("x-ratelimit-reset-requests", bad),
                ]),
            );
        }
        assert_eq!(p.requests_per_minute(), None);
        assert_eq!(p.check(t0, 1), Ok(()));
        p.on_response_to(t0, t0, &headers(&[("x-ratelimit-limit-requests", "0")]));
        assert_eq!(p.requests_per_minute(), None);
    }

    #[test]
    fn bad_configuration_names_the_field() {
        let field = |c: PacingConfig| Pacer::new(c).unwrap_err().field();
        assert_eq!(
            field(PacingConfig::new().with_requests_per_minute(Some(0.0))),
            "pacing.requests_per_minute"
        );
        assert_eq!(
            field(PacingConfig::new().with_tokens_per_minute(Some(f64::NAN))),
            "pacing.tokens_per_minute"
        );
        assert_eq!(
            field(PacingConfig::new().with_request_burst(0)),
            "pacing.request_burst"
        );
        assert_eq!(field(PacingConfig::new().with_safety(1.5)), "pacing.safety");
        assert_eq!(
            field(PacingConfig::new().with_max_hold(Duration::ZERO)),
            "pacing.max_hold"
        );
    }
}
