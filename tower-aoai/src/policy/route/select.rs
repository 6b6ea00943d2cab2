//! The router core: which backend gets the next attempt, and what each attempt's outcome changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backend::{BackendId, Backends, MAX_BACKENDS};
use super::blocked::SupportRecord;
use super::breaker::{Breaker, BreakerPolicy, BreakerState};
use super::hedge::{HedgePolicy, LatencyHistogram};
use crate::policy::ConfigError;
use crate::policy::classify::{Classification, Outcome, TransientKind};

/// How the router reacts to outcomes: cooldowns, resource blocks, breakers, hedging, and how long
/// a call may fail over and wait.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    default_cooldown: Duration,
    cooldown_jitter: f64,
    block_for: Duration,
    max_attempts: u32,
    max_wait: Duration,
    breaker: BreakerPolicy,
    hedge: HedgePolicy,
}

impl Default for RoutePolicy {
    /// 10 s cooldown on a 429 without a hint, hints jittered up to 10 % later, a 403 block keeps a
    /// resource out for 1 h, 6 attempts per call, waits of at most 60 s when the call has no
    /// deadline, [`BreakerPolicy::default`], [`HedgePolicy::default`].
    fn default() -> Self {
        Self {
            default_cooldown: Duration::from_secs(10),
            cooldown_jitter: 0.1,
            block_for: Duration::from_secs(3600),
            max_attempts: 6,
            max_wait: Duration::from_secs(60),
            breaker: BreakerPolicy::default(),
            hedge: HedgePolicy::default(),
        }
    }
}

impl RoutePolicy {
    /// The default policy; adjust it with the `with_*` methods.
    pub fn new() -> Self {
        Self::default()
    }

    /// The cooldown after a 429 that carries no delay hint.
    pub fn with_default_cooldown(mut self, cooldown: Duration) -> Result<Self, ConfigError> {
        if cooldown.is_zero() {
            return Err(ConfigError::new(
                "default_cooldown",
                "must be greater than zero",
            ));
        }
        self.default_cooldown = cooldown;
        Ok(self)
    }

    /// The largest fraction added to a cooldown (default 0.1), so backends cooled by one burst do
    /// not all come back in the same millisecond.
    pub fn with_cooldown_jitter(mut self, fraction: f64) -> Result<Self, ConfigError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(ConfigError::new(
                "cooldown_jitter",
                format!("must be between 0 and 1, got {fraction}"),
            ));
        }
        self.cooldown_jitter = fraction;
        Ok(self)
    }

    /// How long a 403 "temporarily blocked" keeps its whole resource out (default 1 h).
    pub fn with_block_for(mut self, block_for: Duration) -> Result<Self, ConfigError> {
        if block_for.is_zero() {
            return Err(ConfigError::new("block_for", "must be greater than zero"));
        }
        self.block_for = block_for;
        Ok(self)
    }

    /// Attempts per call across all backends, hedges included (default 6).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Result<Self, ConfigError> {
        self.max_attempts = crate::policy::error::check_attempts("max_attempts", max_attempts)?;
        Ok(self)
    }

    /// The longest a call without a deadline waits for a backend to come back (default 60 s).
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// The breaker for 5xx answers and connection errors.
    pub fn with_breaker(mut self, breaker: BreakerPolicy) -> Self {
        self.breaker = breaker;
        self
    }

    /// Hedging.
    pub fn with_hedge(mut self, hedge: HedgePolicy) -> Self {
        self.hedge = hedge;
        self
    }

    /// The hedging policy.
    pub fn hedge(&self) -> &HedgePolicy {
        &self.hedge
    }

    /// The longest a call without a deadline waits for a backend to come back.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Attempts per call across all backends, hedges included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
}

/// What the driver does next for a call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pick {
    /// Send the attempt to this backend.
    Send(BackendId),
    /// No backend is usable now; one will be at this instant, within the call's deadline.
    Wait(Instant),
    /// No backend can serve within the call's deadline.
    GiveUp(NoBackend),
}

/// Why a call found no backend, and what the caller gets.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NoBackend {
    /// The call used all its attempts.
    pub attempts_exhausted: bool,
    /// When the first backend becomes usable again, if known.
    pub next_usable: Option<Instant>,
    /// The latest 403 block among the resources that are out, if any: when the call's last
    /// attempt was blocked (or no attempt was made), the caller gets a
    /// [`BlockedError`](super::BlockedError) with it.
    pub blocked: Option<Arc<SupportRecord>>,
}

/// What follows an attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Hand this response (or error) to the caller.
    Return,
    /// Try another backend (ask [`Router::pick`] again).
    FailOver,
}

/// Whether an outcome makes the call move to another backend: a 429, a 403 block, a 5xx, 408,
/// 409, a connection error or a timeout.
pub fn fails_over(outcome: Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Throttled(_) | Outcome::Blocked | Outcome::Transient(_)
    )
}

/// One call's progress through the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteCall {
    deadline: Option<Instant>,
    tried: u64,
    attempts: u32,
    hedged: bool,
}

impl RouteCall {
    /// Attempts sent so far, hedges included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether the call already sent to `id`.
    pub fn tried(&self, id: BackendId) -> bool {
        self.tried & (1 << id.0) != 0
    }

    /// The call's deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// Counters, for stats and figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteStats {
    /// Calls started.
    pub calls: u64,
    /// Attempts sent (hedges included).
    pub attempts: u64,
    /// Hedges sent.
    pub hedges: u64,
    /// Attempts cancelled (hedge losers, dropped calls).
    pub cancelled: u64,
    /// Waits for a backend to come back.
    pub waits: u64,
}

/// How often a backend's latency histogram is halved, so a backend that was slow (and so gets
/// little traffic) is judged on its recent answers soon after it recovers.
const LATENCY_HALF_LIFE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct BackendState {
    cooldown_until: Option<Instant>,
    breaker: Breaker,
    in_flight: u32,
    latency: LatencyHistogram,
    decayed_at: Option<Instant>,
    /// Exponentially weighted mean latency of recent successes, in seconds (for the choice).
    recent: Option<f64>,
}

/// Weight of the newest success in a backend's recent latency.
const RECENT_WEIGHT: f64 = 0.2;
/// Share of choices made by weight alone, ignoring load and latency.
const EXPLORE: f64 = 0.02;

#[derive(Debug, Clone)]
struct ResourceBlock {
    until: Instant,
    record: Arc<SupportRecord>,
}

/// Why a backend is not usable now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Availability {
    /// It may take an attempt.
    Usable,
    /// It is cooling down after a 429 until the instant.
    CoolingDown(Instant),
    /// Its breaker is open until the instant.
    BreakerOpen(Instant),
    /// Its breaker is half-open and the one probe is in flight.
    Probing,
    /// Its resource is blocked (403) until the instant.
    Blocked(Instant),
}

impl Availability {
    /// When the backend becomes usable, if it is out for a known time.
    fn until(self) -> Option<Instant> {
        match self {
            Availability::CoolingDown(t)
            | Availability::BreakerOpen(t)
            | Availability::Blocked(t) => Some(t),
            Availability::Usable | Availability::Probing => None,
        }
    }
}

/// The router core: per-backend cooldowns, breakers, latency; per-resource blocks; the hedge
/// budget. Pure: time and randomness come in as arguments.
#[derive(Debug, Clone)]
pub struct Router {
    backends: Backends,
    policy: RoutePolicy,
    state: Vec<BackendState>,
    blocks: Vec<Option<ResourceBlock>>,
    stats: RouteStats,
}

impl Router {
    /// A router over `backends`.
    pub fn new(backends: Backends, policy: RoutePolicy) -> Self {
        let state = backends
            .ids()
            .map(|_| BackendState {
                cooldown_until: None,
                breaker: Breaker::new(),
                in_flight: 0,
                latency: LatencyHistogram::default(),
                decayed_at: None,
                recent: None,
            })
            .collect();
        let blocks = vec![None; backends.resource_count()];
        Self {
            backends,
            policy,
            state,
            blocks,
            stats: RouteStats::default(),
        }
    }

    /// The backends.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// The policy.
    pub fn policy(&self) -> &RoutePolicy {
        &self.policy
    }

    /// The counters.
    pub fn stats(&self) -> RouteStats {
        self.stats
    }

    /// Attempts in flight on `id`.
    pub fn in_flight(&self, id: BackendId) -> u32 {
        self.state[id.0].in_flight
    }

    /// The breaker of `id`.
    pub fn breaker(&self, id: BackendId) -> BreakerState {
        self.state[id.0].breaker.state()
    }

    /// The latency distribution of `id` (time to response headers of its successes).
    pub fn latency(&self, id: BackendId) -> &LatencyHistogram {
        &self.state[id.0].latency
    }

    /// Opens a call at `now` with the caller's `deadline` (counts it for the hedge budget).
    pub fn start(&mut self, now: Instant, deadline: Option<Instant>) -> RouteCall {
        self.policy.hedge.budget_mut().deposit(now);
        self.stats.calls += 1;
        RouteCall {
            deadline,
            tried: 0,
            attempts: 0,
            hedged: false,
        }
    }

    /// Whether `id` may take an attempt at `now`, or why not.
    pub fn availability(&self, id: BackendId, now: Instant) -> Availability {
        let resource = self.backends.resource(id);
        if let Some(block) = &self.blocks[resource.0]
            && now < block.until
        {
            return Availability::Blocked(block.until);
        }
        let s = &self.state[id.0];
        if let Some(until) = s.cooldown_until
            && now < until
        {
            return Availability::CoolingDown(until);
        }
        match s.breaker.state() {
            BreakerState::Open { until } if now < until => Availability::BreakerOpen(until),
            BreakerState::HalfOpen { probing: true } => Availability::Probing,
            _ => Availability::Usable,
        }
    }

    /// Chooses where the call's next attempt goes.
    ///
    /// Among the usable backends (not cooling down, not behind an open breaker or a blocked
    /// resource), those the call has not tried yet are preferred; of those, the ones with room
    /// (`headroom(id) > 0`, the limiter's and pacing's say); of those, the best (lowest) tier;
    /// then the better of two weighted random draws, by headroom over load and recent latency. With no usable
    /// backend: wait for the first to come back if that is within the deadline (or `max_wait`),
    /// else give up.
    pub fn pick(
        &mut self,
        call: &RouteCall,
        now: Instant,
        headroom: &dyn Fn(BackendId) -> f64,
        rng: &mut fastrand::Rng,
    ) -> Pick {
        for s in &mut self.state {
            s.breaker.tick(now);
        }
        if call.attempts >= self.policy.max_attempts {
            return Pick::GiveUp(self.no_backend(true, None, now));
        }
        if let Some(id) = self.choose(now, |_| true, call, headroom, rng) {
            return Pick::Send(id);
        }
        let next = self
            .backends
            .ids()
            .filter_map(|id| self.availability(id, now).until())
            .min();
        let limit = call
            .deadline
            .unwrap_or_else(|| now.checked_add(self.policy.max_wait).unwrap_or(now));
        match next {
            Some(at) if at <= limit => {
                self.stats.waits += 1;
                Pick::Wait(at)
            }
            _ => Pick::GiveUp(self.no_backend(false, next, now)),
        }
    }

    fn no_backend(&self, exhausted: bool, next: Option<Instant>, now: Instant) -> NoBackend {
        let blocked = self
            .blocks
            .iter()
            .flatten()
            .filter(|b| now < b.until)
            .max_by_key(|b| b.record.time)
            .map(|b| b.record.clone());
        NoBackend {
            attempts_exhausted: exhausted,
            next_usable: next,
            blocked,
        }
    }

    fn choose(
        &self,
        now: Instant,
        allowed: impl Fn(BackendId) -> bool,
        call: &RouteCall,
        headroom: &dyn Fn(BackendId) -> f64,
        rng: &mut fastrand::Rng,
    ) -> Option<BackendId> {
        // The candidates as a set of at most `MAX_BACKENDS` bits: no allocation per pick.
        let mut pool = Pool::default();
        for id in self.backends.ids() {
            if allowed(id) && self.availability(id, now) == Availability::Usable {
                pool.insert(id);
            }
        }
        // One candidate: every filter below would keep it (each keeps the whole pool when none
        // passes) and the draw could only give it.
        if let Some(only) = pool.only() {
            return Some(only);
        }
        // Failover first: a backend this call has not tried yet, of any tier, before one it has
        // (a 429'd backend is cooling anyway; this covers a 5xx or a connection error).
        let untried = Pool(pool.0 & !call.tried);
        if !untried.is_empty() {
            pool = untried;
        }
        // Each candidate's headroom is asked once.
        let mut room = [0.0f64; MAX_BACKENDS];
        let mut roomy = Pool::default();
        for id in pool.iter() {
            room[id.0] = headroom(id);
            if room[id.0] > 0.0 {
                roomy.insert(id);
            }
        }
        if !roomy.is_empty() {
            pool = roomy;
        }
        let best = pool.iter().map(|id| self.backends.get(id).tier()).min()?;
        let pool = Pool::from_iter(
            pool.iter()
                .filter(|&id| self.backends.get(id).tier() == best),
        );
        let first = self.weighted(pool, None, rng)?;
        let Some(second) = self.weighted(pool, Some(first), rng) else {
            return Some(first);
        };
        // A small share of plain weighted draws keeps every backend's latency record fresh, so
        // a backend that was slow is seen when it recovers.
        if rng.f64() < EXPLORE {
            return Some(first);
        }
        // Headroom over load and over the square of recent latency, when both have a record:
        // a slow region loses its traffic before its queue grows (in-flight load alone already
        // grows with latency; the square makes the shift decisive).
        let recent = |id: BackendId| self.state[id.0].recent.map(|r| r.max(0.001));
        let latency = match (recent(first), recent(second)) {
            (Some(a), Some(b)) => [a * a, b * b],
            _ => [1.0, 1.0],
        };
        let score = |id: BackendId, latency: f64| {
            room[id.0].max(0.0) / ((1.0 + f64::from(self.state[id.0].in_flight)) * latency)
        };
        Some(if score(second, latency[1]) > score(first, latency[0]) {
            second
        } else {
            first
        })
    }

    fn weighted(
        &self,
        pool: Pool,
        except: Option<BackendId>,
        rng: &mut fastrand::Rng,
    ) -> Option<BackendId> {
        let weight = |id: BackendId| u64::from(self.backends.get(id).weight());
        let candidates = || pool.iter().filter(|&id| Some(id) != except);
        let total: u64 = candidates().map(weight).sum();
        if total == 0 {
            return None;
        }
        let mut draw = rng.u64(0..total);
        for id in candidates() {
            let w = weight(id);
            if draw < w {
                return Some(id);
            }
            draw -= w;
        }
        None
    }

    /// Records that an attempt of `call` was sent to `id` (a probe, if its breaker is half-open).
    pub fn on_send(&mut self, call: &mut RouteCall, id: BackendId, _now: Instant) {
        call.tried |= 1 << id.0;
        call.attempts = call.attempts.saturating_add(1);
        let s = &mut self.state[id.0];
        s.in_flight = s.in_flight.saturating_add(1);
        s.breaker.on_send();
        self.stats.attempts += 1;
    }

    /// Records that an attempt to `id` ended without an outcome (cancelled, dropped).
    pub fn on_cancel(&mut self, id: BackendId) {
        let s = &mut self.state[id.0];
        s.in_flight = s.in_flight.saturating_sub(1);
        s.breaker.on_cancel();
        self.stats.cancelled += 1;
    }

    /// Records that a response from `id` broke off mid-body (a reset after its headers, which
    /// [`on_response`](Self::on_response) already counted): a failure for the backend's breaker,
    /// so a region that resets its streams is left alone like one that refuses connections.
    pub fn on_body_failed(&mut self, id: BackendId, now: Instant) {
        self.state[id.0]
            .breaker
            .on_result(&self.policy.breaker, true, now);
    }

    /// Records the outcome of an attempt to `id` whose response headers (or error) arrived after
    /// `latency`, and says whether the call returns or fails over. A 403 block without a record
    /// gets a minimal one: prefer [`on_blocked`](Self::on_blocked).
    pub fn on_response(
        &mut self,
        id: BackendId,
        class: &Classification,
        latency: Duration,
        now: Instant,
        rng: &mut fastrand::Rng,
    ) -> Step {
        let s = &mut self.state[id.0];
        s.in_flight = s.in_flight.saturating_sub(1);
        let failed = matches!(
            class.outcome,
            Outcome::Transient(
                TransientKind::ServerError
                    | TransientKind::Overloaded
                    | TransientKind::Connect
                    | TransientKind::Timeout
            )
        );
        match class.outcome {
            Outcome::Blocked => {
                s.breaker.on_cancel();
                let b = self.backends.get(id);
                let record = SupportRecord::new(
                    b.name(),
                    self.backends.resource_host(self.backends.resource(id)),
                    b.deployment(),
                    b.region(),
                    http::StatusCode::FORBIDDEN,
                    &http::HeaderMap::new(),
                    b"",
                    std::time::SystemTime::UNIX_EPOCH,
                );
                self.block(id, record, now);
                return Step::FailOver;
            }
            Outcome::Success => {
                let since = *s.decayed_at.get_or_insert(now);
                if now.saturating_duration_since(since) >= LATENCY_HALF_LIFE {
                    s.latency.decay();
                    s.decayed_at = Some(now);
                }
                s.latency.record(latency);
                let secs = latency.as_secs_f64();
                s.recent = Some(s.recent.map_or(secs, |r| r + RECENT_WEIGHT * (secs - r)));
                s.breaker.on_result(&self.policy.breaker, false, now);
            }
            _ => s.breaker.on_result(&self.policy.breaker, failed, now),
        }
        let cools = matches!(class.outcome, Outcome::Throttled(_))
            || (matches!(class.outcome, Outcome::Transient(_)) && class.hint.is_some());
        if cools {
            let delay = class.hint.map_or(self.policy.default_cooldown, |h| h.delay);
            let jitter = delay.mul_f64(self.policy.cooldown_jitter * rng.f64());
            let until = now.checked_add(delay + jitter).unwrap_or(now + delay);
            // A later, shorter hint never shortens a longer cooldown.
            s.cooldown_until = Some(s.cooldown_until.map_or(until, |u| u.max(until)));
        }
        if fails_over(class.outcome) {
            Step::FailOver
        } else {
            Step::Return
        }
    }

    /// Records a 403 "temporarily blocked" from `id`: its whole resource is out for `block_for`.
    /// Use instead of [`on_response`](Self::on_response) when the driver has the response.
    pub fn on_blocked(&mut self, id: BackendId, record: SupportRecord, now: Instant) -> Step {
        let s = &mut self.state[id.0];
        s.in_flight = s.in_flight.saturating_sub(1);
        s.breaker.on_cancel();
        self.block(id, record, now);
        Step::FailOver
    }

    /// The support record of the latest 403 block of backend `id`'s resource, if it had one.
    pub fn block_record(&self, id: BackendId) -> Option<Arc<SupportRecord>> {
        self.blocks[self.backends.resource(id).0]
            .as_ref()
            .map(|b| b.record.clone())
    }

    fn block(&mut self, id: BackendId, record: SupportRecord, now: Instant) {
        let resource = self.backends.resource(id);
        let until = now.checked_add(self.policy.block_for).unwrap_or(now);
        let until = self.blocks[resource.0]
            .as_ref()
            .map_or(until, |b| b.until.max(until));
        self.blocks[resource.0] = Some(ResourceBlock {
            until,
            record: Arc::new(record),
        });
    }

    /// How long to let the attempt to `primary` run before hedging it, if it is hedged at all:
    /// the primary's hedge quantile (p95), or the fastest other usable backend's when that is
    /// shorter (a backend that is slow throughout would otherwise never look late).
    pub fn hedge_delay(
        &self,
        call: &RouteCall,
        primary: BackendId,
        now: Instant,
    ) -> Option<Duration> {
        // A lone backend has nowhere to hedge to.
        if call.hedged || self.backends.len() < 2 {
            return None;
        }
        let own = self.policy.hedge.delay(&self.state[primary.0].latency)?;
        let other = self
            .backends
            .ids()
            .filter(|&id| id != primary && self.availability(id, now) == Availability::Usable)
            .filter_map(|id| self.policy.hedge.delay(&self.state[id.0].latency))
            .min();
        Some(other.map_or(own, |o| o.min(own)))
    }

    /// Chooses a *different* usable backend with room for a hedge of the attempt to `primary`,
    /// if the hedge budget allows one (the budget is spent when a backend is returned; the driver
    /// then calls [`on_send`](Self::on_send)).
    pub fn pick_hedge(
        &mut self,
        call: &mut RouteCall,
        primary: BackendId,
        now: Instant,
        headroom: &dyn Fn(BackendId) -> f64,
        rng: &mut fastrand::Rng,
    ) -> Option<BackendId> {
        if call.hedged || !self.policy.hedge.enabled() || call.attempts >= self.policy.max_attempts
        {
            return None;
        }
        for s in &mut self.state {
            s.breaker.tick(now);
        }
        let id = self.choose(
            now,
            |id| id != primary && headroom(id) > 0.0,
            call,
            headroom,
            rng,
        )?;
        if !self.policy.hedge.budget_mut().try_withdraw(now) {
            return None;
        }
        call.hedged = true;
        self.stats.hedges += 1;
        Some(id)
    }
}

/// A set of backends, one bit each (a router holds at most [`MAX_BACKENDS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Pool(u64);

impl Pool {
    fn insert(&mut self, id: BackendId) {
        self.0 |= 1 << id.0;
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The one backend in the set, if it holds exactly one.
    fn only(self) -> Option<BackendId> {
        (self.0.count_ones() == 1).then(|| BackendId(self.0.trailing_zeros() as usize))
    }

    /// The backends in the set, in order.
    fn iter(self) -> impl Iterator<Item = BackendId> {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            if rest == 0 {
                return None;
            }
            let id = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            Some(BackendId(id))
        })
    }
}

impl FromIterator<BackendId> for Pool {
    fn from_iter<I: IntoIterator<Item = BackendId>>(ids: I) -> Self {
        let mut pool = Pool::default();
        for id in ids {
            pool.insert(id);
        }
        pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::classify::ThrottleCause;
    use crate::policy::hints::{DelayHint, HintSource};
    use crate::policy::route::Backend;

    fn class(outcome: Outcome, hint: Option<Duration>) -> Classification {
        Classification {
            outcome,
            retryable: true,
            hint: hint.map(|delay| DelayHint {
                delay,
                source: HintSource::RetryAfterMs,
            }),
        }
    }

    fn router(list: Vec<Backend>) -> Router {
        Router::new(
            Backends::new(list).unwrap(),
            RoutePolicy::default().with_cooldown_jitter(0.0).unwrap(),
        )
    }

    const ROOM: &dyn Fn(BackendId) -> f64 = &|_| 1.0;
    const THROTTLE: Outcome = Outcome::Throttled(ThrottleCause::Quota);

    fn id(i: usize) -> BackendId {
        BackendId(i)
    }

    #[test]
    fn tiers_in_order_then_spillover() {
        let mut r = router(vec![
            Backend::new("ptu", "https://ptu.example").with_tier(0),
            Backend::new("std-a", "https://a.example").with_tier(1),
            Backend::new("std-b", "https://b.example").with_tier(1),
        ]);
        let mut rng = fastrand::Rng::with_seed(1);
        let t0 = Instant::now();
        for _ in 0..50 {
            let call = r.start(t0, None);
            assert_eq!(r.pick(&call, t0, ROOM, &mut rng), Pick::Send(id(0)));
        }
        // No room on the PTU: spill to the standard tier, both standard backends get traffic.
        let no_ptu_room = |b: BackendId| if b == id(0) { 0.0 } else { 1.0 };
        let mut seen = [0; 3];
        for _ in 0..100 {
            let call = r.start(t0, None);
            let Pick::Send(b) = r.pick(&call, t0, &no_ptu_room, &mut rng) else {
                panic!()
            };
            seen[b.0] += 1;
        }
        assert_eq!(seen[0], 0);
        assert!(seen[1] > 20 && seen[2] > 20, "{seen:?}");
        // No room anywhere: the best tier still takes it (its limiter queues).
        let call = r.start(t0, None);
        assert_eq!(r.pick(&call, t0, &|_| 0.0, &mut rng), Pick::Send(id(0)));
    }

    #[test]
    fn throttle_fails_over_at_once_and_cooldown_expires() {
        let mut r = router(vec![
            Backend::new("a", "https://a.example"),
            Backend::new("b", "https://b.example"),
        ]);
        let mut rng = fastrand::Rng::with_seed(2);
        let t0 = Instant::now();
        let mut call = r.start(t0, Some(t0 + Duration::from_secs(30)));
        let Pick::Send(first) = r.pick(&call, t0, ROOM, &mut rng) else {
            panic!()
        };
        r.on_send(&mut call, first, t0);
        let step = r.on_response(
            first,
            &class(THROTTLE, Some(Duration::from_secs(5))),
            Duration::ZERO,
            t0,
            &mut rng,
        );
        assert_eq!(step, Step::FailOver);
        assert_eq!(
            r.availability(first, t0),
            Availability::CoolingDown(t0 + Duration::from_secs(5))
        );
        let Pick::Send(second) = r.pick(&call, t0, ROOM, &mut rng) else {
            panic!()
        };
        assert_ne!(first, second);
        r.on_send(&mut call, second, t0);
        // No hint: the default 10 s.
        r.on_response(second, &class(THROTTLE, None), Duration::ZERO, t0, &mut rng);
        assert_eq!(
            r.pick(&call, t0, ROOM, &mut rng),
            Pick::Wait(t0 + Duration::from_secs(5))
        );
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(r.pick(&call, t5, ROOM, &mut rng), Pick::Send(first));
    }

    #[test]
    fn a_shorter_hint_never_shortens_a_cooldown() {
        let mut r = router(vec![Backend::new("a", "https://a.example")]);
        let mut rng = fastrand::Rng::with_seed(3);
        let t0 = Instant::now();
        let mut call = r.start(t0, None);
        r.on_send(&mut call, id(0), t0);
        r.on_response(
            id(0),
            &class(THROTTLE, Some(Duration::from_secs(20))),
            Duration::ZERO,
            t0,
            &mut rng,
        );
        r.on_send(&mut call, id(0), t0);
        r.on_response(
            id(0),
            &class(THROTTLE, Some(Duration::from_secs(1))),
            Duration::ZERO,
            t0,
            &mut rng,
        );
        assert_eq!(
            r.availability(id(0), t0),
            Availability::CoolingDown(t0 + Duration::from_secs(20))
        );
    }

    #[test]
    fn wait_beyond_the_deadline_gives_up() {
        let mut r = router(vec![Backend::new("a", "https://a.example")]);
        let mut rng = fastrand::Rng::with_seed(4);
        let t0 = Instant::now();
        let mut call = r.start(t0, Some(t0 + Duration::from_secs(3)));
        r.on_send(&mut call, id(0), t0);
        r.on_response(
            id(0),
            &class(THROTTLE, Some(Duration::from_secs(6))),
            Duration::ZERO,
            t0,
            &mut rng,
        );
        let Pick::GiveUp(g) = r.pick(&call, t0, ROOM, &mut rng) else {
            panic!()
        };
        assert_eq!(g.next_usable, Some(t0 + Duration::from_secs(6)));
        assert!(!g.attempts_exhausted);
        assert_eq!(g.blocked, None);
    }

    #[test]
    fn a_block_takes_out_the_whole_resource() {
        let mut r = router(vec![
            Backend::new("east-4o", "https://east.example").with_deployment("gpt4o"),
            Backend::new("east-mini", "https://east.example").with_deployment("mini"),
            Backend::new("west", "https://west.example").with_tier(1),
        ]);
        let mut rng = fastrand::Rng::with_seed(5);
        let t0 = Instant::now();
        let mut call = r.start(t0, None);
        r.on_send(&mut call, id(0), t0);
        let record = SupportRecord::new(
            "east-4o",
            "east.example",
            Some("gpt4o"),
            None,
            http::StatusCode::FORBIDDEN,
            &http::HeaderMap::new(),
            b"blocked",
            std::time::SystemTime::UNIX_EPOCH,
        );
        assert_eq!(r.on_blocked(id(0), record, t0), Step::FailOver);
        let until = t0 + Duration::from_secs(3600);
        assert_eq!(r.availability(id(1), t0), Availability::Blocked(until));
        for _ in 0..20 {
            let call = r.start(t0, None);
            assert_eq!(r.pick(&call, t0, ROOM, &mut rng), Pick::Send(id(2)));
        }
        // West goes down too: the caller gets the block record.
        for _ in 0..5 {
            let mut c = r.start(t0, None);
            r.on_send(&mut c, id(2), t0);
            r.on_response(
                id(2),
                &class(Outcome::Transient(TransientKind::Connect), None),
                Duration::ZERO,
                t0,
                &mut rng,
            );
        }
        // Without a deadline the call waits for west's breaker (30 s), within max_wait.
        let call = r.start(t0, None);
        assert_eq!(
            r.pick(&call, t0, ROOM, &mut rng),
            Pick::Wait(t0 + Duration::from_secs(30))
        );
        let call = r.start(t0, Some(t0 + Duration::from_secs(10)));
        let Pick::GiveUp(g) = r.pick(&call, t0, ROOM, &mut rng) else {
            panic!()
        };
        assert_eq!(g.blocked.unwrap().body, "blocked");
        let back = r.pick(&call, until, ROOM, &mut rng);
        assert!(
            back == Pick::Send(id(0)) || back == Pick::Send(id(1)),
            "{back:?}"
        );
    }

    #[test]
    fn breaker_half_open_recovery() {
        let mut r = router(vec![
            Backend::new("a", "https://a.example"),
            Backend::new("b", "https://b.example").with_tier(1),
        ]);
        let mut rng = fastrand::Rng::with_seed(6);
        let t0 = Instant::now();
        for _ in 0..5 {
            let mut c = r.start(t0, None);
            r.on_send(&mut c, id(0), t0);
            r.on_response(
                id(0),
                &class(Outcome::Transient(TransientKind::ServerError), None),
                Duration::ZERO,
                t0,
                &mut rng,
            );
        }
        let t30 = t0 + Duration::from_secs(30);
        assert_eq!(r.availability(id(0), t0), Availability::BreakerOpen(t30));
        let c = r.start(t0, None);
        assert_eq!(r.pick(&c, t0, ROOM, &mut rng), Pick::Send(id(1)));
        // Half-open: one probe goes to a; meanwhile others go to b.
        let mut probe = r.start(t30, None);
        assert_eq!(r.pick(&probe, t30, ROOM, &mut rng), Pick::Send(id(0)));
        r.on_send(&mut probe, id(0), t30);
        let c = r.start(t30, None);
        assert_eq!(r.pick(&c, t30, ROOM, &mut rng), Pick::Send(id(1)));
        r.on_response(
            id(0),
            &class(Outcome::Success, None),
            Duration::from_millis(5),
            t30,
            &mut rng,
        );
        assert_eq!(r.breaker(id(0)), BreakerState::Closed);
        let c = r.start(t30, None);
        assert_eq!(r.pick(&c, t30, ROOM, &mut rng), Pick::Send(id(0)));
    }

    #[test]
    fn hedges_need_samples_budget_and_another_backend() {
        let mut r = router(vec![
            Backend::new("a", "https://a.example"),
            Backend::new("b", "https://b.example"),
        ]);
        let mut rng = fastrand::Rng::with_seed(7);
        let t0 = Instant::now();
        for i in 0..100u64 {
            let mut c = r.start(t0, None);
            let Pick::Send(b) = r.pick(&c, t0, ROOM, &mut rng) else {
                panic!()
            };
            assert_eq!(
                r.hedge_delay(&c, b, t0).is_some(),
                r.latency(b).count() >= 20
            );
            r.on_send(&mut c, b, t0);
            r.on_response(
                b,
                &class(Outcome::Success, None),
                Duration::from_millis(100 + i),
                t0,
                &mut rng,
            );
        }
        let mut c = r.start(t0, None);
        assert!(r.hedge_delay(&c, id(0), t0).unwrap() >= Duration::from_millis(150));
        r.on_send(&mut c, id(0), t0);
        assert_eq!(r.pick_hedge(&mut c, id(0), t0, ROOM, &mut rng), Some(id(1)));
        assert_eq!(r.hedge_delay(&c, id(0), t0), None, "one hedge per call");
        // The budget: 101 calls at 5 % buy 5 hedges in the window.
        let mut hedges = 1;
        for _ in 0..20 {
            let mut c = r.start(t0, None);
            r.on_send(&mut c, id(0), t0);
            hedges += usize::from(r.pick_hedge(&mut c, id(0), t0, ROOM, &mut rng).is_some());
        }
        assert_eq!(hedges, 6);
        // Never into a cooling backend.
        let t20 = t0 + Duration::from_secs(20);
        let mut c = r.start(t20, None);
        r.on_send(&mut c, id(1), t20);
        r.on_response(id(1), &class(THROTTLE, None), Duration::ZERO, t20, &mut rng);
        let mut c = r.start(t20, None);
        r.on_send(&mut c, id(0), t20);
        assert_eq!(r.pick_hedge(&mut c, id(0), t20, ROOM, &mut rng), None);
    }
}
