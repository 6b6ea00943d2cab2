//! The adaptive concurrency limit of one backend, tuned by the service's throttle signal.
//!
//! [`AdaptiveLimit`] decides how many attempts may be in flight to one backend. The caller asks
//! for a [`Permit`] before sending ([`AdaptiveLimit::try_acquire`]) and hands it back exactly once:
//! with the attempt's [`Outcome`] ([`AdaptiveLimit::on_outcome`]) or as cancelled
//! ([`AdaptiveLimit::on_cancel`]). A permit is a plain, non-`Clone` value: the drivers wrap it in
//! an RAII guard that reports "cancelled" when it is dropped without an outcome, so in-flight
//! accounting stays exact however a call ends.
//!
//! # The control law
//!
//! - **Slow start** until the first throttle: every successful attempt made while the window was
//!   in use (at least `utilisation` of the limit in flight at some point during the attempt) adds
//!   one, so the limit doubles per round trip, as TCP's window does.
//! - **Multiplicative cut, once per episode**: a throttle ([`Outcome::is_throttle`]: a 429 of any
//!   cause, a 503 "overloaded") multiplies the limit by `decrease`. Each permit records the cut
//!   epoch it was issued in; a throttle on a permit issued *before* the latest cut belongs to the
//!   episode that cut already answered and does not cut again. So a burst of twenty 429s that all
//!   left before the cut costs one cut, not twenty.
//! - **Concave recovery, then gentle probing** (BIC/CUBIC's shape): below the level where the last
//!   throttle struck, the limit closes half the gap per round trip (at least `probe_step`, at most
//!   `max_step`), so it is back near the old level within a few round trips and then lingers there;
//!   above it, the limit grows by one per round trip, the additive increase of AIMD. Growth only
//!   happens at high utilisation: an unused window is never inflated.
//! - **Idle decay** (TCP after idle, RFC 2861): when nothing has been in flight for an idle period
//!   (`max(idle_floor, srtt + 4 rttvar)`, at most `idle_ceiling`), the limit halves per idle period
//!   down to `initial`, and the slow-start threshold remembers 3/4 of the level before the idle
//!   time. The climb back doubles per round trip up to that threshold, then probes gently: fast,
//!   but never the burst that gets a resource "temporarily blocked".
//!
//! # Defaults, against the anchors
//!
//! | setting | default | why |
//! |---|---|---|
//! | `initial` | 4 | TCP starts at 10 segments, Vector at 1, Netflix at 20. LLM calls are long (seconds); 4 in flight is a polite first contact and slow start reaches 64 in four round trips. |
//! | `min` / `max` | 1 / 256 | Never starve a backend; 256 bounds memory and what a runaway climb could send. |
//! | `decrease` | 0.7 | AWS's CUBIC limiter and TCP CUBIC use 0.7. Netflix and Vector use 0.9 because they cut on *every* throttle, so a burst of 429s compounds (0.9^10 = 0.35); with one cut per episode a single deeper cut ends the episode in one round trip, and the concave recovery wins the throughput back. inspect_ai uses 0.8 and then stops growing for max(15 s, Retry-After). |
//! | `utilisation` | 0.8 | inspect_ai grows at >= 80 % utilisation; Netflix at >= 50 %, which inflates a window the client does not use. |
//! | `probe_step` / `max_step` | 0.25 / 8 per round trip | Near the last throttle level the limit probes one slot per four round trips, so episodes are rare (<= 1 throttled attempt per 100 successes at steady state); far below it recovery is quick. |
//! | `idle_floor` / `idle_ceiling` | 5 s / 60 s | RFC 6298's RTO is at least 1 s and at most 60 s; LLM calls take seconds, so an idle period is at least 5 s. |
//! | `idle_memory` | 0.75 | Linux `tcp_slow_start_after_idle`: ssthresh = max(ssthresh, 3/4 cwnd). |
//!
//! None of the anchors decays after idle (inspect_ai, Vector and Netflix keep their limit forever,
//! and so send their full old window at once after hours of silence), and none of them cuts once
//! per episode except inspect_ai, whose cooldown also freezes growth when the throttle was brief.

use std::time::{Duration, Instant};

use super::ConfigError;
use super::classify::Outcome;

/// The settings of an [`AdaptiveLimit`]. See the [module docs](self) for what each one does and
/// why its default is what it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitConfig {
    initial: u32,
    min: u32,
    max: u32,
    decrease: f64,
    utilisation: f64,
    probe_step: f64,
    max_step: f64,
    idle_floor: Duration,
    idle_ceiling: Duration,
    idle_memory: f64,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            initial: 4,
            min: 1,
            max: 256,
            decrease: 0.7,
            utilisation: 0.8,
            probe_step: 0.25,
            max_step: 8.0,
            idle_floor: Duration::from_secs(5),
            idle_ceiling: Duration::from_secs(60),
            idle_memory: 0.75,
        }
    }
}

impl LimitConfig {
    /// The default settings; adjust them with the `with_*` methods. Settings are checked together
    /// by [`AdaptiveLimit::new`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The limit at the start, and the floor of idle decay.
    pub fn with_initial(mut self, initial: u32) -> Self {
        self.initial = initial;
        self
    }

    /// The lowest the limit may go (at least 1).
    pub fn with_min(mut self, min: u32) -> Self {
        self.min = min;
        self
    }

    /// The highest the limit may go.
    pub fn with_max(mut self, max: u32) -> Self {
        self.max = max;
        self
    }

    /// The factor a throttle multiplies the limit by (strictly between 0 and 1).
    pub fn with_decrease(mut self, decrease: f64) -> Self {
        self.decrease = decrease;
        self
    }

    /// The share of the limit that must be in flight for a success to grow it (0 to 1).
    pub fn with_utilisation(mut self, utilisation: f64) -> Self {
        self.utilisation = utilisation;
        self
    }

    /// The smallest and largest growth per round trip while recovering toward the last throttle
    /// level.
    pub fn with_steps(mut self, probe_step: f64, max_step: f64) -> Self {
        self.probe_step = probe_step;
        self.max_step = max_step;
        self
    }

    /// The shortest and longest idle period (the measured round trip sets it in between).
    pub fn with_idle_period(mut self, floor: Duration, ceiling: Duration) -> Self {
        self.idle_floor = floor;
        self.idle_ceiling = ceiling;
        self
    }

    /// The share of the pre-idle limit kept as the slow-start threshold (0 to 1).
    pub fn with_idle_memory(mut self, idle_memory: f64) -> Self {
        self.idle_memory = idle_memory;
        self
    }

    /// The initial limit.
    pub fn initial(&self) -> u32 {
        self.initial
    }

    /// The minimum limit.
    pub fn min(&self) -> u32 {
        self.min
    }

    /// The maximum limit.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// The multiplicative decrease.
    pub fn decrease(&self) -> f64 {
        self.decrease
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.min == 0 {
            return Err(ConfigError::new("limit.min", "must be at least 1"));
        }
        if self.max < self.min {
            return Err(ConfigError::new(
                "limit.max",
                format!(
                    "must be at least limit.min ({}), got {}",
                    self.min, self.max
                ),
            ));
        }
        if !(self.min..=self.max).contains(&self.initial) {
            return Err(ConfigError::new(
                "limit.initial",
                format!(
                    "must be between limit.min ({}) and limit.max ({}), got {}",
                    self.min, self.max, self.initial
                ),
            ));
        }
        if !(self.decrease > 0.0 && self.decrease < 1.0) {
            return Err(ConfigError::new(
                "limit.decrease",
                format!("must be strictly between 0 and 1, got {}", self.decrease),
            ));
        }
        if !(0.0..=1.0).contains(&self.utilisation) {
            return Err(ConfigError::new(
                "limit.utilisation",
                format!("must be between 0 and 1, got {}", self.utilisation),
            ));
        }
        if !(self.probe_step.is_finite() && self.probe_step > 0.0) {
            return Err(ConfigError::new(
                "limit.probe_step",
                format!("must be a positive number, got {}", self.probe_step),
            ));
        }
        if !(self.max_step.is_finite() && self.max_step >= self.probe_step) {
            return Err(ConfigError::new(
                "limit.max_step",
                format!(
                    "must be at least limit.probe_step ({}), got {}",
                    self.probe_step, self.max_step
                ),
            ));
        }
        if self.idle_floor.is_zero() {
            return Err(ConfigError::new(
                "limit.idle_floor",
                "must be greater than zero",
            ));
        }
        if self.idle_ceiling < self.idle_floor {
            return Err(ConfigError::new(
                "limit.idle_ceiling",
                format!(
                    "must be at least limit.idle_floor ({:?}), got {:?}",
                    self.idle_floor, self.idle_ceiling
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.idle_memory) {
            return Err(ConfigError::new(
                "limit.idle_memory",
                format!("must be between 0 and 1, got {}", self.idle_memory),
            ));
        }
        Ok(())
    }
}

/// The right to send one attempt to a backend, issued by [`AdaptiveLimit::try_acquire`].
///
/// Hand it back exactly once, with [`AdaptiveLimit::on_outcome`] or [`AdaptiveLimit::on_cancel`].
/// It is deliberately neither `Clone` nor `Copy`; a driver keeps it in an RAII guard.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a permit must be returned with on_outcome or on_cancel, or the limit leaks"]
pub struct Permit {
    epoch: u64,
    sent_at: Instant,
    tokens: u64,
    saturation: u64,
    issued_saturated: bool,
}

impl Permit {
    /// The cut epoch the permit was issued in (the number of cuts before it).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// When the permit was issued (when the attempt was sent).
    pub fn sent_at(&self) -> Instant {
        self.sent_at
    }

    /// The estimated tokens of the attempt.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Records when the attempt actually left, when that is later than the permit's issue (after
    /// a pacing wait): the round trip is measured from then.
    pub fn sent(mut self, at: Instant) -> Self {
        self.sent_at = self.sent_at.max(at);
        self
    }
}

/// What an outcome did to the limit.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Adjustment {
    /// The limit is unchanged (a non-throttle failure, or a success at low utilisation, or the
    /// limit is at its maximum).
    Unchanged,
    /// A success at high utilisation grew the limit.
    Grew {
        /// The limit before, as a real number (growth is fractional).
        from: f64,
        /// The limit after.
        to: f64,
    },
    /// A throttle cut the limit and opened a new episode.
    Cut {
        /// The limit before.
        from: f64,
        /// The limit after.
        to: f64,
    },
    /// A throttle on an attempt sent before the latest cut: the episode was already answered.
    SameEpisode,
}

/// The adaptive concurrency limit of one backend. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct AdaptiveLimit {
    config: LimitConfig,
    /// The congestion window: a real number, so that growth can be fractional per success.
    window: f64,
    /// Below this the window grows by one per utilised success (slow start).
    ssthresh: f64,
    /// The window when the last throttle struck (the level recovery heads for).
    last_max: Option<f64>,
    in_flight: u32,
    tokens_in_flight: u64,
    epoch: u64,
    /// Counts the moments the window was in use; a permit issued before the latest one saw its
    /// window in use during its life.
    saturation: u64,
    last_activity: Option<Instant>,
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl Default for AdaptiveLimit {
    fn default() -> Self {
        Self::new(LimitConfig::default()).expect("the default limit configuration is valid")
    }
}

impl AdaptiveLimit {
    /// A limit with `config`; a setting out of range is an error naming it.
    pub fn new(config: LimitConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            window: f64::from(config.initial),
            ssthresh: f64::INFINITY,
            last_max: None,
            in_flight: 0,
            tokens_in_flight: 0,
            epoch: 0,
            saturation: 0,
            last_activity: None,
            srtt: None,
            rttvar: Duration::ZERO,
        })
    }

    /// The settings.
    pub fn config(&self) -> &LimitConfig {
        &self.config
    }

    /// The number of attempts that may be in flight now (the window, rounded down).
    pub fn limit(&self) -> u32 {
        self.whole(self.window)
    }

    /// The limit as a real number (growth accumulates in fractions of one).
    pub fn window(&self) -> f64 {
        self.window
    }

    /// The limit as it will be at `now` once idle decay is applied (what the next acquire sees).
    pub fn limit_at(&self, now: Instant) -> u32 {
        self.whole(self.decayed(now).0)
    }

    /// Attempts in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Estimated tokens of the attempts in flight.
    pub fn tokens_in_flight(&self) -> u64 {
        self.tokens_in_flight
    }

    /// How many more attempts may start at `now` (0 when full).
    pub fn available(&self, now: Instant) -> u32 {
        self.limit_at(now).saturating_sub(self.in_flight)
    }

    /// The number of cuts so far; permits issued now carry this epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The slow-start threshold, once there is one (after the first throttle or idle period).
    pub fn slow_start_threshold(&self) -> Option<f64> {
        self.ssthresh.is_finite().then_some(self.ssthresh)
    }

    /// Whether the limit is still in slow start (doubling per round trip).
    pub fn in_slow_start(&self) -> bool {
        self.window < self.ssthresh
    }

    /// The smoothed round-trip time of successful attempts, once measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// How long nothing may be in flight before the limit decays by half.
    pub fn idle_period(&self) -> Duration {
        let rto = self.srtt.map_or(Duration::ZERO, |s| {
            s.saturating_add(self.rttvar.saturating_mul(4))
        });
        rto.clamp(self.config.idle_floor, self.config.idle_ceiling)
    }

    /// Issues a permit for an attempt of `tokens` estimated tokens, or `None` when the limit is
    /// reached. Applies idle decay first.
    pub fn try_acquire(&mut self, now: Instant, tokens: u64) -> Option<Permit> {
        self.apply_idle(now);
        if self.in_flight >= self.limit() {
            return None;
        }
        self.in_flight += 1;
        self.tokens_in_flight = self.tokens_in_flight.saturating_add(tokens);
        self.touch(now);
        let issued_saturated = f64::from(self.in_flight) >= self.utilised_level();
        if issued_saturated {
            self.saturation += 1;
        }
        Some(Permit {
            epoch: self.epoch,
            sent_at: now,
            tokens,
            saturation: self.saturation,
            issued_saturated,
        })
    }

    /// Returns a permit with its attempt's outcome, and adapts the limit.
    pub fn on_outcome(&mut self, permit: Permit, outcome: Outcome, now: Instant) -> Adjustment {
        let utilised = self.was_utilised(&permit);
        self.release(&permit, now);
        if outcome.is_throttle() {
            if permit.epoch < self.epoch {
                return Adjustment::SameEpisode;
            }
            return self.cut();
        }
        if outcome != Outcome::Success {
            return Adjustment::Unchanged;
        }
        self.sample_rtt(now.saturating_duration_since(permit.sent_at));
        if !utilised {
            return Adjustment::Unchanged;
        }
        self.grow()
    }

    /// Returns a permit whose attempt ended without an outcome (cancelled, dropped).
    pub fn on_cancel(&mut self, permit: Permit, now: Instant) {
        self.release(&permit, now);
    }

    /// Tells the limit that the server asked for a pause until `until`: a pause the server asked
    /// for is not idleness, so idle decay is measured from its end.
    pub fn on_server_hold(&mut self, until: Instant) {
        if self.last_activity.is_some_and(|at| at < until) {
            self.last_activity = Some(until);
        }
    }

    fn whole(&self, window: f64) -> u32 {
        // The window always lies in [min, max]; the clamp only guards the conversion.
        (window.floor() as u32).clamp(self.config.min, self.config.max)
    }

    /// The in-flight count that means "the window is in use".
    fn utilised_level(&self) -> f64 {
        (self.config.utilisation * f64::from(self.limit())).max(1.0)
    }

    /// Whether the window was in use at some moment of the permit's life: at its issue, at a
    /// later acquire, or now (before it is released). Judging only at completion would miss the
    /// attempts of a burst that finish last, and slow start would not double.
    fn was_utilised(&self, permit: &Permit) -> bool {
        permit.issued_saturated
            || self.saturation > permit.saturation
            || f64::from(self.in_flight) >= self.utilised_level()
    }

    fn release(&mut self, permit: &Permit, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.tokens_in_flight = self.tokens_in_flight.saturating_sub(permit.tokens);
        self.touch(now);
    }

    fn touch(&mut self, now: Instant) {
        if self.last_activity.is_none_or(|at| at < now) {
            self.last_activity = Some(now);
        }
    }

    fn cut(&mut self) -> Adjustment {
        let from = self.window;
        // CUBIC's fast convergence: a throttle below the previous level means capacity shrank,
        // so aim recovery lower than where it struck.
        let target = match self.last_max {
            Some(previous) if from < previous => from * (1.0 + self.config.decrease) / 2.0,
            _ => from,
        };
        self.last_max = Some(target);
        let to = (from * self.config.decrease)
            .clamp(f64::from(self.config.min), f64::from(self.config.max));
        self.window = to;
        self.ssthresh = to;
        self.epoch += 1;
        Adjustment::Cut { from, to }
    }

    fn grow(&mut self) -> Adjustment {
        let from = self.window;
        let max = f64::from(self.config.max);
        if from >= max {
            return Adjustment::Unchanged;
        }
        let step = if from < self.ssthresh {
            // Slow start: one per success is a doubling per round trip; never past ssthresh.
            (self.ssthresh - from).min(1.0)
        } else {
            // Congestion avoidance: the growth per round trip, shared among a window of successes.
            let per_round_trip = match self.last_max {
                Some(target) if from < target => {
                    ((target - from) / 2.0).clamp(self.config.probe_step, self.config.max_step)
                }
                Some(target) if from < target + 1.0 => self.config.probe_step,
                _ => 1.0,
            };
            // Never faster than slow start: at most one per success.
            (per_round_trip / from).min(1.0)
        };
        let to = (from + step).min(max);
        self.window = to;
        Adjustment::Grew { from, to }
    }

    fn sample_rtt(&mut self, rtt: Duration) {
        // RFC 6298's estimator (alpha 1/8, beta 1/4).
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + delta) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    /// The window and threshold after idle decay at `now`, without changing anything.
    fn decayed(&self, now: Instant) -> (f64, f64) {
        let (Some(last), 0) = (self.last_activity, self.in_flight) else {
            return (self.window, self.ssthresh);
        };
        let idle = now.saturating_duration_since(last);
        let period = self.idle_period();
        let periods = (idle.as_nanos() / period.as_nanos().max(1)).min(64) as i32;
        let initial = f64::from(self.config.initial);
        if periods == 0 || self.window <= initial {
            return (self.window, self.ssthresh);
        }
        let remembered = self.window * self.config.idle_memory;
        let ssthresh = if self.ssthresh.is_finite() {
            self.ssthresh.max(remembered)
        } else {
            remembered
        };
        let window = (self.window / 2f64.powi(periods)).max(initial);
        (window, ssthresh.max(window))
    }

    fn apply_idle(&mut self, now: Instant) {
        let (window, ssthresh) = self.decayed(now);
        if window < self.window {
            self.window = window;
            self.ssthresh = ssthresh;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::classify::{ThrottleCause, TransientKind};

    const THROTTLE: Outcome = Outcome::Throttled(ThrottleCause::Quota);

    fn limit(initial: u32) -> AdaptiveLimit {
        AdaptiveLimit::new(LimitConfig::new().with_initial(initial)).unwrap()
    }

    /// Sends `n` attempts at once and completes them all with `outcome` at `at`.
    fn round(l: &mut AdaptiveLimit, t: Instant, at: Instant, outcome: Outcome) -> usize {
        let mut permits = Vec::new();
        while let Some(p) = l.try_acquire(t, 10) {
            permits.push(p);
        }
        let n = permits.len();
        for p in permits {
            let _ = l.on_outcome(p, outcome, at);
        }
        n
    }

    #[test]
    fn slow_start_doubles_per_round_trip() {
        let mut l = limit(4);
        let t0 = Instant::now();
        let rtt = Duration::from_secs(1);
        let mut sizes = Vec::new();
        for i in 0..4 {
            let t = t0 + rtt * i;
            sizes.push(round(&mut l, t, t + rtt, Outcome::Success));
        }
        assert_eq!(sizes, vec![4, 8, 16, 32]);
        assert_eq!(l.limit(), 64);
        assert!(l.in_slow_start());
    }

    #[test]
    fn no_growth_when_the_window_is_not_used() {
        let mut l = limit(10);
        let t0 = Instant::now();
        for i in 0..50 {
            let t = t0 + Duration::from_millis(100 * i);
            let p = l.try_acquire(t, 1).unwrap();
            assert_eq!(l.on_outcome(p, Outcome::Success, t), Adjustment::Unchanged);
        }
        assert_eq!(l.limit(), 10);
    }

    #[test]
    fn one_cut_per_episode() {
        let mut l = limit(20);
        let t0 = Instant::now();
        let permits: Vec<_> = (0..20).map(|_| l.try_acquire(t0, 1).unwrap()).collect();
        let mut cuts = 0;
        for p in permits {
            if let Adjustment::Cut { from, to } = l.on_outcome(p, THROTTLE, t0) {
                cuts += 1;
                assert_eq!((from, to), (20.0, 14.0));
            }
        }
        assert_eq!(cuts, 1);
        assert_eq!(l.limit(), 14);
        assert_eq!(l.epoch(), 1);
        // A throttle on an attempt sent after the cut opens a new episode.
        let p = l.try_acquire(t0, 1).unwrap();
        assert!(matches!(
            l.on_outcome(p, Outcome::Transient(TransientKind::Overloaded), t0),
            Adjustment::Cut { .. }
        ));
        assert_eq!(l.epoch(), 2);
    }

    #[test]
    fn never_below_min() {
        let mut l = AdaptiveLimit::new(LimitConfig::new().with_initial(2).with_min(2)).unwrap();
        let t0 = Instant::now();
        for _ in 0..10 {
            let p = l.try_acquire(t0, 1).unwrap();
            let _ = l.on_outcome(p, THROTTLE, t0);
        }
        assert_eq!(l.limit(), 2);
    }

    #[test]
    fn recovery_is_quick_then_probes_gently() {
        let mut l = limit(4);
        let t0 = Instant::now();
        let rtt = Duration::from_secs(1);
        let mut t = t0;
        // Slow start up to 32, then a throttle.
        while l.limit() < 32 {
            round(&mut l, t, t + rtt, Outcome::Success);
            t += rtt;
        }
        let p = l.try_acquire(t, 1).unwrap();
        let _ = l.on_outcome(p, THROTTLE, t);
        assert_eq!(l.limit(), 22);
        let mut history = Vec::new();
        for _ in 0..12 {
            round(&mut l, t, t + rtt, Outcome::Success);
            t += rtt;
            history.push(l.window());
        }
        // Within 4 round trips it is back above 30 (of 32) ...
        assert!(history[3] > 30.0, "{history:?}");
        // ... and it has not probed far past the old level after 12.
        assert!(history[11] < 34.0, "{history:?}");
    }

    #[test]
    fn idle_decay_halves_per_period_and_remembers_three_quarters() {
        let mut l = limit(4);
        let t0 = Instant::now();
        let rtt = Duration::from_secs(1);
        let mut t = t0;
        while l.limit() < 64 {
            round(&mut l, t, t + rtt, Outcome::Success);
            t += rtt;
        }
        let period = l.idle_period();
        assert_eq!(period, Duration::from_secs(5));
        assert_eq!(l.limit_at(t + period - Duration::from_millis(1)), 64);
        assert_eq!(l.limit_at(t + period), 32);
        assert_eq!(l.limit_at(t + period * 2), 16);
        assert_eq!(l.limit_at(t + Duration::from_secs(3600)), 4);
        // After an hour, the next round sends only the initial window; then it slow-starts to
        // 3/4 of 64 and probes from there.
        t += Duration::from_secs(3600);
        assert_eq!(round(&mut l, t, t + rtt, Outcome::Success), 4);
        assert_eq!(l.slow_start_threshold(), Some(48.0));
        let mut sizes = Vec::new();
        for _ in 0..4 {
            t += rtt;
            sizes.push(round(&mut l, t, t + rtt, Outcome::Success));
        }
        assert_eq!(sizes, vec![8, 16, 32, 48]);
    }

    #[test]
    fn a_server_hold_is_not_idleness() {
        let mut l = limit(16);
        let t0 = Instant::now();
        round(&mut l, t0, t0, Outcome::Success);
        let window = l.window();
        l.on_server_hold(t0 + Duration::from_secs(20));
        assert_eq!(l.limit_at(t0 + Duration::from_secs(21)), window as u32);
    }

    #[test]
    fn permits_are_conserved() {
        let mut l = limit(8);
        let t0 = Instant::now();
        let a = l.try_acquire(t0, 100).unwrap();
        let b = l.try_acquire(t0, 50).unwrap();
        assert_eq!((l.in_flight(), l.tokens_in_flight()), (2, 150));
        l.on_cancel(a, t0);
        let _ = l.on_outcome(b, Outcome::Success, t0);
        assert_eq!((l.in_flight(), l.tokens_in_flight()), (0, 0));
    }

    #[test]
    fn the_limit_is_enforced() {
        let mut l = limit(3);
        let t0 = Instant::now();
        let permits: Vec<_> = (0..3).map(|_| l.try_acquire(t0, 1).unwrap()).collect();
        assert!(l.try_acquire(t0, 1).is_none());
        assert_eq!(l.available(t0), 0);
        for p in permits {
            l.on_cancel(p, t0);
        }
        assert_eq!(l.available(t0), 3);
    }

    #[test]
    fn bad_configuration_names_the_field() {
        let field = |c: LimitConfig| AdaptiveLimit::new(c).unwrap_err().field();
        assert_eq!(field(LimitConfig::new().with_min(0)), "limit.min");
        assert_eq!(field(LimitConfig::new().with_max(0)), "limit.max");
        assert_eq!(
            field(LimitConfig::new().with_initial(1000)),
            "limit.initial"
        );
        assert_eq!(
            field(LimitConfig::new().with_decrease(1.0)),
            "limit.decrease"
        );
        assert_eq!(
            field(LimitConfig::new().with_utilisation(2.0)),
            "limit.utilisation"
        );
        assert_eq!(
            field(LimitConfig::new().with_steps(0.0, 1.0)),
            "limit.probe_step"
        );
        assert_eq!(
            field(LimitConfig::new().with_steps(1.0, 0.5)),
            "limit.max_step"
        );
        assert_eq!(
            field(LimitConfig::new().with_idle_period(Duration::ZERO, Duration::ZERO)),
            "limit.idle_floor"
        );
        assert_eq!(
            field(LimitConfig::new().with_idle_memory(-0.1)),
            "limit.idle_memory"
        );
    }
}
