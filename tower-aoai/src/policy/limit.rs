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
//!   one, so the limit doubles per round trip, as TCP's window does. An unused window never grows.
//! - **One cut per episode**: a throttle ([`Outcome::is_throttle`]: a 429 of any cause, a 503
//!   "overloaded") cuts the limit. Each permit records the cut epoch it was issued in; a throttle
//!   on a permit issued *before* the latest cut belongs to the episode that cut already answered
//!   and does not cut again. A burst of twenty 429s that all left before the cut costs one cut.
//! - **How much**: a *failed probe* (the throttle struck at the level where the last one struck,
//!   after a full round trip of this epoch's attempts succeeded) steps back one slot, to the level
//!   that held; anything else (the first throttle, a throttle below the old level, throttles in a
//!   row) is a drop in capacity and multiplies the limit by `decrease`.
//! - **Stray throttles**: peak-load 429s hit a share of requests at random, whatever the load. A
//!   throttle on an attempt sent at a load that has held for a round trip is
//!   [tolerated](Adjustment::Tolerated) while such throttles stay rare (under a quarter, smoothed);
//!   a real drop throttles in a row and is cut on within about three.
//! - **Recovery, plateau, probing** (BIC/CUBIC's shape): the level to hold is one slot below
//!   where the last throttle struck. Below it the limit closes half the gap per round trip (at
//!   least `probe_step`); across that slot it lingers, crossing it in `probe_interval` successes
//!   (or `max_plateau` round trips if sooner), so a probe, one throttled attempt, comes about once
//!   per `probe_interval` successes; past it, the growth per round trip grows with the distance
//!   (BIC's max probing), so capacity that came back is found in a few round trips.
//! - **Idle decay** (TCP after idle, RFC 2861): when nothing has been in flight for an idle period
//!   (`max(idle_floor, srtt + 4 rttvar)`, at most `idle_ceiling`), the limit halves per idle period
//!   down to `initial`, and the slow-start threshold remembers 3/4 of the level before the idle
//!   time. The climb back doubles per round trip up to that threshold, then probes: fast, but
//!   never the burst that gets a resource "temporarily blocked".
//!
//! The limit is the window *rounded* (a window of 2.8 after a cut from 4 allows 3, not 2).
//!
//! # Defaults, against the anchors
//!
//! | setting | default | why |
//! |---|---|---|
//! | `initial` | 4 | TCP starts at 10 segments, Vector at 1, Netflix at 20. LLM calls are long (seconds); 4 in flight is a polite first contact and slow start reaches 64 in four round trips. |
//! | `min` / `max` | 1 / 256 | Never starve a backend; 256 bounds what a runaway climb could send. |
//! | `decrease` | 0.7 | AWS's CUBIC limiter and TCP CUBIC use 0.7. Netflix and Vector use 0.9 because they cut on *every* throttle, so a burst of 429s compounds (0.9^10 = 0.35); with one cut per episode a single deeper cut ends a real drop in one round trip, and failed probes, the common case at steady state, step back one slot instead. inspect_ai uses 0.8 and then freezes growth for max(15 s, Retry-After). |
//! | `utilisation` | 0.8 | inspect_ai grows at >= 80 % utilisation; Netflix at >= 50 %, which inflates a window the client does not use. |
//! | `probe_step` / `max_step` | 0.5 / 8 per round trip | Recovery toward the held level is quick, growth past it bounded. |
//! | `probe_interval` / `max_plateau` | 100 successes / 8 round trips | One probe (one throttled attempt) per 100 successes at steady state: the "<= 1 throttle per 100 successes" aim, by construction. Vector and Netflix probe every round trip (+1), so a window of 12 is throttled every ~12 successes. |
//! | `idle_floor` / `idle_ceiling` | 5 s / 60 s | RFC 6298's RTO is at least 1 s and at most 60 s; LLM calls take seconds, so an idle period is at least 5 s. |
//! | `idle_memory` | 0.75 | Linux `tcp_slow_start_after_idle`: ssthresh = max(ssthresh, 3/4 cwnd). |
//!
//! None of the anchors decays after idle (inspect_ai, Vector and Netflix keep their limit forever,
//! and so send their full old window at once after hours of silence), and only inspect_ai cuts
//! once per episode. Measured on the simulator's scenarios: `tower-aoai/LIMITER.md`.

use std::time::{Duration, Instant};

use super::ConfigError;
use super::classify::Outcome;

/// The weight of each attempt sent at a held load in the smoothed stray-throttle rate.
const STRAY_WEIGHT: f64 = 0.1;
/// Above this smoothed share of throttles at a held load, they are no longer strays.
const STRAY_TOLERANCE: f64 = 0.25;

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
    probe_interval: u32,
    max_plateau: u32,
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
            probe_step: 0.5,
            max_step: 8.0,
            probe_interval: 100,
            max_plateau: 8,
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

    /// The smallest and largest growth per round trip while recovering toward the level that
    /// held (and the largest while probing past it).
    pub fn with_steps(mut self, probe_step: f64, max_step: f64) -> Self {
        self.probe_step = probe_step;
        self.max_step = max_step;
        self
    }

    /// How rarely the limit probes above the level that held: one slot is crossed in
    /// `successes` successful attempts, or `max_round_trips` round trips if that is sooner.
    pub fn with_probe_interval(mut self, successes: u32, max_round_trips: u32) -> Self {
        self.probe_interval = successes;
        self.max_plateau = max_round_trips;
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
        if self.probe_interval == 0 {
            return Err(ConfigError::new(
                "limit.probe_interval",
                "must be at least 1",
            ));
        }
        if self.max_plateau == 0 {
            return Err(ConfigError::new("limit.max_plateau", "must be at least 1"));
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
    load: u32,
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
    /// A stray throttle: the attempt was sent at a load that has held for a round trip, and such
    /// throttles are rare (peak-load 429s that hit at random). Counted, not cut on.
    Tolerated,
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
    /// Successful attempts issued since the latest cut.
    epoch_successes: u32,
    /// Share of throttles among attempts sent at a load that had held (smoothed).
    stray_rate: f64,
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
            epoch_successes: 0,
            stray_rate: 0.0,
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
            load: self.in_flight,
        })
    }

    /// Returns a permit with its attempt's outcome, and adapts the limit.
    pub fn on_outcome(&mut self, permit: Permit, outcome: Outcome, now: Instant) -> Adjustment {
        let utilised = self.was_utilised(&permit);
        // The load that held: one slot below where the last throttle struck.
        let held = self
            .last_max
            .map(|struck| (struck.round() - 1.0).max(f64::from(self.config.min)));
        let at_held_load = held.is_some_and(|h| f64::from(permit.load) <= h);
        if at_held_load && (outcome.is_throttle() || outcome == Outcome::Success) {
            let throttled = if outcome.is_throttle() { 1.0 } else { 0.0 };
            self.stray_rate = self.stray_rate * (1.0 - STRAY_WEIGHT) + throttled * STRAY_WEIGHT;
        }
        self.release(&permit, now);
        if outcome.is_throttle() {
            if permit.epoch < self.epoch {
                return Adjustment::SameEpisode;
            }
            // Regional peak-load throttling rejects a share of requests at random, whatever the
            // load. Cutting on each such 429 would take the limit to its minimum while capacity
            // is there; a throttle at a load that has held for a round trip is ignored while
            // they stay rare. A real drop in capacity throttles in a row and is cut on within
            // about three throttles.
            if at_held_load
                && self.epoch_successes >= self.limit()
                && self.stray_rate < STRAY_TOLERANCE
            {
                return Adjustment::Tolerated;
            }
            return self.cut();
        }
        if outcome != Outcome::Success {
            return Adjustment::Unchanged;
        }
        if permit.epoch == self.epoch {
            self.epoch_successes = self.epoch_successes.saturating_add(1);
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
        // Rounded, not floored: at a window of 2.8 (a cut from 4) flooring would lose a third of
        // the capacity. The window lies in [min, max]; the clamp only guards the conversion.
        (window.round() as u32).clamp(self.config.min, self.config.max)
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
        let min = f64::from(self.config.min);
        // A failed probe: the throttle struck at the level where the last one struck, after a
        // full round trip of this epoch's attempts succeeded below it. Capacity has not moved; the
        // answer is one slot back, to the level that held, not a multiplicative cut and several
        // round trips below capacity. Anything else
        // (the first throttle, a throttle below the old level, or throttles in a row) is a drop
        // in capacity and gets the multiplicative cut.
        let failed_probe = self.last_max.is_some_and(|struck| from >= struck - 1.0)
            && self.epoch_successes >= self.limit();
        let to = if failed_probe {
            // One slot below the limit that overloaded, at the bottom of that slot's band so the
            // plateau lasts a whole slot.
            (from.round() - 1.49).max(min)
        } else {
            from * self.config.decrease
        }
        .clamp(min, f64::from(self.config.max));
        // (CUBIC's "fast convergence", aiming lower when a throttle strikes below the previous
        // level, is left out: it exists to make room for competing flows, and here it fires on
        // noise, a throttle at 12.5 after one at 13, and parks the limit a fifth below capacity.)
        self.last_max = Some(from);
        self.window = to;
        self.ssthresh = to;
        self.epoch += 1;
        self.epoch_successes = 0;
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
            // Congestion avoidance. The level to hold is one slot below where the last throttle
            // struck (after idle, the remembered level). Below it, close half the gap per round
            // trip (at least `probe_step`), a growth per round trip shared among a window of
            // successes. Across that slot, the plateau, where throughput is highest and nothing is
            // throttled: cross it in `probe_interval` successes, or `max_plateau` round trips if
            // that is sooner, so a probe (one throttle) comes at most once per `probe_interval`
            // successes. Past it, probe at a pace that grows with the distance (BIC's max
            // probing), so capacity that came back is found in a few round trips.
            let target = self.last_max.map_or(self.ssthresh, |struck| {
                (struck - 1.0).max(f64::from(self.config.min))
            });
            let per_success = if from < target {
                ((target - from) / 2.0).clamp(self.config.probe_step, self.config.max_step) / from
            } else if from < target + 1.0 {
                (1.0 / f64::from(self.config.probe_interval))
                    .max(1.0 / (f64::from(self.config.max_plateau) * from))
            } else {
                (from - target).clamp(1.0, self.config.max_step) / from
            };
            // Never faster than slow start: at most one per success.
            per_success.min(1.0)
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

    /// Slow start to 32, then one throttle: the multiplicative cut.
    fn after_first_cut(l: &mut AdaptiveLimit, t: &mut Instant, rtt: Duration) {
        while l.limit() < 32 {
            round(l, *t, *t + rtt, Outcome::Success);
            *t += rtt;
        }
        let p = l.try_acquire(*t, 1).unwrap();
        assert!(matches!(
            l.on_outcome(p, THROTTLE, *t),
            Adjustment::Cut { from: 32.0, .. }
        ));
        assert_eq!(l.limit(), 22);
    }

    #[test]
    fn recovery_is_quick_then_holds_then_probes_faster_and_faster() {
        let mut l = limit(4);
        let mut t = Instant::now();
        let rtt = Duration::from_secs(1);
        after_first_cut(&mut l, &mut t, rtt);
        let mut history = Vec::new();
        for _ in 0..12 {
            round(&mut l, t, t + rtt, Outcome::Success);
            t += rtt;
            history.push(l.window());
        }
        // Within 4 round trips it is back above 29 (of 31, one slot below where it struck) ...
        assert!(history[3] > 29.0, "{history:?}");
        // ... it holds at 31 or below for a while (the plateau) ...
        assert!(
            history[4..8].iter().all(|w| w.round() <= 31.0),
            "{history:?}"
        );
        // ... and, with no throttle, probes upward faster and faster.
        assert!(
            history[11] - history[10] > history[10] - history[9],
            "{history:?}"
        );
        assert!(history[11] > 36.0, "{history:?}");
    }

    /// Rounds of successes until the limit reaches `level`.
    fn climb_to(l: &mut AdaptiveLimit, t: &mut Instant, rtt: Duration, level: u32) {
        for _ in 0..100 {
            if l.limit() >= level {
                return;
            }
            round(l, *t, *t + rtt, Outcome::Success);
            *t += rtt;
        }
        panic!("never reached {level}: {}", l.window());
    }

    #[test]
    fn a_failed_probe_steps_back_one_slot_not_a_multiplicative_cut() {
        let mut l = limit(4);
        let mut t = Instant::now();
        let rtt = Duration::from_secs(1);
        after_first_cut(&mut l, &mut t, rtt);
        // The probe: the limit reaches 32 again, where the last throttle struck.
        climb_to(&mut l, &mut t, rtt, 32);
        let permits: Vec<_> = (0..32).map(|_| l.try_acquire(t, 1).unwrap()).collect();
        let mut cut = None;
        for (i, p) in permits.into_iter().enumerate() {
            let outcome = if i == 31 { THROTTLE } else { Outcome::Success };
            if let Adjustment::Cut { to, .. } = l.on_outcome(p, outcome, t + rtt) {
                cut = Some(to);
            }
        }
        let to = cut.expect("the probe's throttle cuts");
        assert_eq!(to.round(), 31.0, "{to}");
        assert_eq!(l.limit(), 31);
    }

    #[test]
    fn stray_throttles_at_a_held_load_are_tolerated_until_they_are_not_rare() {
        let mut l = limit(4);
        let mut t = Instant::now();
        let rtt = Duration::from_secs(1);
        after_first_cut(&mut l, &mut t, rtt);
        climb_to(&mut l, &mut t, rtt, 30);
        let epoch = l.epoch();
        // A round trip at 30 held; one throttle at that load is a stray.
        let p = l.try_acquire(t, 1).unwrap();
        assert_eq!(l.on_outcome(p, THROTTLE, t), Adjustment::Tolerated);
        assert_eq!(l.epoch(), epoch);
        // Throttles in a row are a drop in capacity: cut within a few.
        let mut tolerated = 0;
        loop {
            let p = l.try_acquire(t, 1).unwrap();
            match l.on_outcome(p, THROTTLE, t) {
                Adjustment::Tolerated => tolerated += 1,
                Adjustment::Cut { from, to } => {
                    assert!(to <= from * 0.7 + 1e-9, "{from} -> {to}");
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(tolerated <= 2, "{tolerated} throttles in a row tolerated");
        assert_eq!(l.epoch(), epoch + 1);
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
            field(LimitConfig::new().with_probe_interval(0, 8)),
            "limit.probe_interval"
        );
        assert_eq!(
            field(LimitConfig::new().with_probe_interval(100, 0)),
            "limit.max_plateau"
        );
        assert_eq!(
            field(LimitConfig::new().with_idle_memory(-0.1)),
            "limit.idle_memory"
        );
    }
}
