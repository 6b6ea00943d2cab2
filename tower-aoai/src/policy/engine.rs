//! A whole call as one sans-IO state machine: retry, route, limit and pace, observe.
//!
//! The tower layers compose the core's pieces one middleware at a time. Drivers that run a call
//! themselves — the Rust [`Stack`](crate::stack::Stack), the Python transports, the simulator's
//! virtual-time clients — use [`Engine`], which
//! composes the *same* pieces in the same order (retry → route → limit and pace per backend) so
//! that every decision is still made here, once:
//!
//! - [`RetryPolicy`] + [`RetryBudget`]: how many attempts, the deadline, the budget, the backoff;
//! - [`Router`]: which backend, cooldowns from the server's hints, 403 resource blocks, breakers,
//!   when to wait for a backend to come back;
//! - [`AdaptiveLimit`] + [`Pacer`] per backend: how many attempts in flight, and when a send may go;
//! - [`Stats`]: what happened, for `stats()` and [`diagnose`](super::diagnose::diagnose).
//!
//! The driver loop:
//!
//! ```text
//! call = engine.start(now, body, deadline)
//! loop {
//!     match engine.next(&mut call, now) {
//!         Next::Send(ticket) => send to ticket.backend() (rewritten unless passthrough),
//!             then engine.on_response(..) / engine.on_error(..) / engine.on_cancel(..):
//!                 After::Return => return the response,
//!                 After::GiveUp(_) => return it marked `x-should-retry: false` (or raise the error),
//!                 After::Retry => continue,
//!         Next::Wait(d) => sleep d, continue,
//!         Next::Queue(d) => wait in line until a returned permit wakes it or d passes, continue,
//!         Next::Fail(f) => raise the typed error,
//!     }
//! }
//! engine.forget(&mut call)   // when the call ends some other way (dropped while queued)
//! ```
//!
//! Queued calls are served first come, first served: a new call does not take a permit that came
//! back to calls queued on its backend. A driver wakes the first call in line when a permit comes
//! back ([`Engine::has_queued`]), not all of them; a woken call passes the wake on when
//! [`Engine::passes_wake_on`] says so.
//!
//! A driver that hands a success's body up as a stream uses
//! [`Engine::on_response_streamed`] instead of `on_response`: the success keeps its concurrency
//! permit in a [`Lease`] until the body ends ([`Engine::end_body`]), as the Rust limit layer's
//! body does, so a streaming call holds its slot while it streams.
//!
//! A driver that can race two attempts asks [`Engine::hedge_delay`] how long to let an attempt
//! run, then [`Engine::hedge`] for a second attempt to a different backend; the first successful
//! answer wins and the other is cancelled ([`Engine::on_cancel`]).
//!
//! A failover to another backend never sleeps; a wait happens only when no backend is usable, or
//! when the only usable one just failed without a hint (backoff).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, StatusCode};

use super::classify::{self, Classification, Outcome, TransportError};
use super::diagnose::{self, Diagnosis};
use super::headers::RateLimitHeaders;
use super::limit::{AdaptiveLimit, LimitConfig, Permit};
use super::pacing::{Pacer, PacingConfig};
use super::retry::{Action, CallState, GiveUpReason, RetryPolicy};
use super::route::{
    Availability, Backend, BackendId, Backends, Pick, RouteCall, RoutePolicy, RouteStats, Router,
    SupportRecord,
};
use super::stats::{self, Attempt, Gauges, Stats};
use super::{ConfigError, RetryBudget, TokenEstimator};

/// The longest single wait for a permit before the call looks again (an attempt ending wakes the
/// waiters earlier in every driver; this only bounds a missed wake-up).
const QUEUE_RECHECK: Duration = Duration::from_secs(1);

/// The name of the implicit backend of a passthrough engine.
pub const PASSTHROUGH_BACKEND: &str = "default";

/// Everything an [`Engine`] is built from.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Attempts, deadline, longest wait, backoff.
    pub retry: RetryPolicy,
    /// The retry budget shared by every call.
    pub budget: RetryBudget,
    /// Cooldowns, blocks, breakers, hedging.
    pub route: RoutePolicy,
    /// The adaptive limit of each backend.
    pub limit: LimitConfig,
    /// The pacing of each backend (known RPM/TPM, or learned from headers).
    pub pacing: PacingConfig,
    /// Per-backend pacing overrides, by backend name.
    pub pacing_by_backend: Vec<(String, PacingConfig)>,
    /// The token estimate of a request body.
    pub tokens: TokenEstimator,
    /// The longest a call waits for a permit before it fails as overloaded.
    pub queue_timeout: Duration,
    /// Seeds the jitter and the backend choice (reproducible runs).
    pub seed: Option<u64>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            budget: RetryBudget::default(),
            route: RoutePolicy::default(),
            limit: LimitConfig::default(),
            pacing: PacingConfig::default(),
            pacing_by_backend: Vec::new(),
            tokens: TokenEstimator::default(),
            queue_timeout: Duration::from_secs(30),
            seed: None,
        }
    }
}

/// An attempt in flight: which backend, and the permit it holds. Hand it back exactly once, to
/// [`Engine::on_response`], [`Engine::on_error`] or [`Engine::on_cancel`].
#[derive(Debug)]
#[must_use = "a ticket holds a permit; hand it back to the engine"]
pub struct Ticket {
    backend: BackendId,
    permit: Permit,
    sent_at: Instant,
    retry: bool,
    hedge: bool,
}

impl Ticket {
    /// The backend the attempt goes to.
    pub fn backend(&self) -> BackendId {
        self.backend
    }

    /// When the attempt was sent.
    pub fn sent_at(&self) -> Instant {
        self.sent_at
    }

    /// Whether the attempt is a hedge of another one ([`Engine::hedge`]).
    pub fn is_hedge(&self) -> bool {
        self.hedge
    }
}

/// The concurrency permit of a successful attempt whose body is still being read: the backend is
/// working on the call until the body ends. Hand it back exactly once, to [`Engine::end_body`].
#[derive(Debug)]
#[must_use = "a lease holds a permit; hand it back with Engine::end_body"]
pub struct Lease {
    backend: BackendId,
    permit: Permit,
}

impl Lease {
    /// The backend whose permit this is.
    pub fn backend(&self) -> BackendId {
        self.backend
    }
}

/// How a leased response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyEnd {
    /// Read to its end: the attempt counts as a success, its round trip measured to now.
    Finished,
    /// The body broke off (a transport error while reading): counted as a connection failure by
    /// the limit and as a failure by the backend's breaker.
    Failed,
    /// Closed or dropped before its end: the permit goes back without an outcome.
    Dropped,
}

/// What the driver does next for a call.
#[derive(Debug)]
#[non_exhaustive]
pub enum Next {
    /// Send an attempt to the ticket's backend.
    Send(Ticket),
    /// Sleep this long, then ask again (a cooldown, pacing or backoff; never past the deadline).
    Wait(Duration),
    /// Every usable backend is at its concurrency limit, or calls queue ahead of this one: wait
    /// in line until a returned permit wakes the call (or this long at most), then ask again.
    Queue(Duration),
    /// The call cannot be served.
    Fail(Failure),
}

/// Why a call cannot be served.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Failure {
    /// Every resource that could serve is blocked (403); the latest block's record.
    Blocked(Arc<SupportRecord>),
    /// The call waited `queue_timeout` for a permit.
    Overloaded,
    /// No backend is usable within the deadline.
    NoBackend,
    /// The call's deadline passed before an attempt could be sent.
    DeadlineExceeded,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Blocked(record) => write!(
                f,
                "every resource that could serve is temporarily blocked (403); latest: {} ({})",
                record.resource,
                record
                    .apim_request_id
                    .as_deref()
                    .unwrap_or("no apim-request-id")
            ),
            Failure::Overloaded => f.write_str("no concurrency permit within the queue timeout"),
            Failure::NoBackend => f.write_str("no backend is usable within the call's deadline"),
            Failure::DeadlineExceeded => {
                f.write_str("the call's deadline passed before an attempt")
            }
        }
    }
}

/// What follows an attempt's response or error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum After {
    /// Return the response as it is (success, or a failure retrying cannot help).
    Return,
    /// Make another attempt: ask [`Engine::next`].
    Retry,
    /// Return this response marked `x-should-retry: false` (or raise this error): no more
    /// attempts.
    GiveUp(GiveUpReason),
}

/// One call's progress.
#[derive(Debug, Clone)]
pub struct EngineCall {
    retry: CallState,
    route: RouteCall,
    tokens: u64,
    not_before: Option<Instant>,
    queued_since: Option<Instant>,
    sent: u32,
    last_outcome: Option<Outcome>,
    /// The backend the call just failed over from: its next attempt goes elsewhere when it can,
    /// even to a worse tier (a 5xx leaves the backend usable, so the tier alone would pick it).
    avoid: Option<BackendId>,
    /// Where the request really goes, for a passthrough engine (whose backend has no host).
    origin: Option<String>,
    /// The backend whose queue the call waits in (counted in its `queue_depth`).
    queued_on: Option<BackendId>,
    /// Attempts of the call running now (2 while a hedge races its primary).
    racing: u8,
}

impl EngineCall {
    /// Names the host (`host[:port]`) the request goes to. A passthrough engine's backend has no
    /// host of its own, so a 403 support record names this one; a configured backend always names
    /// its own endpoint.
    pub fn set_origin(&mut self, origin: impl Into<String>) {
        self.origin = Some(origin.into());
    }

    /// Attempts sent so far.
    pub fn attempts(&self) -> u32 {
        self.sent
    }

    /// The estimated tokens of the call's request.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The call's deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.retry.deadline()
    }

    /// The outcome of the call's latest attempt that got one.
    pub fn last_outcome(&self) -> Option<Outcome> {
        self.last_outcome
    }

    /// Whether the call is waiting for a permit (its latest [`Next`] was [`Next::Queue`]).
    pub fn is_queued(&self) -> bool {
        self.queued_on.is_some()
    }
}

/// The full stack's decisions for drivers that run calls themselves. See the [module docs](self).
#[derive(Debug)]
pub struct Engine {
    retry: RetryPolicy,
    budget: RetryBudget,
    router: Router,
    limits: Vec<AdaptiveLimit>,
    pacers: Vec<Pacer>,
    tokens: TokenEstimator,
    queue_timeout: Duration,
    stats: Stats,
    rng: fastrand::Rng,
    passthrough: bool,
    /// Calls waiting for a permit, per backend.
    queued: Vec<u32>,
    observer: Option<Observer>,
}

/// What a driver runs on every attempt the engine records ([`Engine::with_observer`]).
struct Observer(Box<dyn Fn(&Attempt<'_>) + Send + Sync>);

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Observer")
    }
}

impl Engine {
    /// An engine over `backends`; `None` makes a passthrough engine whose one implicit backend is
    /// wherever the request already goes (no rewriting).
    pub fn new(backends: Option<Backends>, config: EngineConfig) -> Result<Self, ConfigError> {
        let passthrough = backends.is_none();
        let backends = match backends {
            Some(b) => b,
            None => Backends::new(vec![Backend::new(
                PASSTHROUGH_BACKEND,
                "http://passthrough.invalid",
            )])?,
        };
        if config.queue_timeout.is_zero() {
            return Err(ConfigError::new(
                "queue_timeout",
                "must be greater than zero",
            ));
        }
        for (name, _) in &config.pacing_by_backend {
            if backends.find(name).is_none() {
                return Err(ConfigError::new(
                    "pacing_by_backend",
                    format!("names no configured backend: {name:?}"),
                ));
            }
        }
        let mut limits = Vec::with_capacity(backends.len());
        let mut pacers = Vec::with_capacity(backends.len());
        for id in backends.ids() {
            limits.push(AdaptiveLimit::new(config.limit)?);
            let name = backends.get(id).name();
            let pacing = config
                .pacing_by_backend
                .iter()
                .find(|(n, _)| n == name)
                .map_or(config.pacing, |(_, p)| *p);
            pacers.push(Pacer::new(pacing)?);
        }
        let queued = vec![0; backends.len()];
        Ok(Self {
            retry: config.retry,
            budget: config.budget,
            router: Router::new(backends, config.route),
            limits,
            pacers,
            tokens: config.tokens,
            queue_timeout: config.queue_timeout,
            stats: Stats::new(),
            rng: config
                .seed
                .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed),
            passthrough,
            queued,
            observer: None,
        })
    }

    /// Runs `observer` on every attempt as the engine records it into its stats (a driver's
    /// `tracing` event and metrics, say). It runs while the engine is borrowed: keep it short.
    pub fn with_observer(
        mut self,
        observer: impl Fn(&Attempt<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.observer = Some(Observer(Box::new(observer)));
        self
    }

    /// Whether requests go where they already point (no backends configured).
    pub fn is_passthrough(&self) -> bool {
        self.passthrough
    }

    /// The backends.
    pub fn backends(&self) -> &Backends {
        self.router.backends()
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The token estimator [`start`](Self::start) uses.
    pub fn token_estimator(&self) -> &TokenEstimator {
        &self.tokens
    }

    /// Whether any call waits for a permit now: a driver that gives a permit back wakes its
    /// queued calls only then.
    pub fn has_queued(&self) -> bool {
        self.queued.iter().any(|&n| n > 0)
    }

    /// Whether a backend that calls queue on has a free permit at `now`.
    pub fn queued_have_room(&self, now: Instant) -> bool {
        self.queued
            .iter()
            .zip(&self.limits)
            .any(|(&n, limit)| n > 0 && limit.available(now) > 0)
    }

    /// Whether a call that a returned permit woke from the queue, and to which [`next`]
    /// answered `next` at `now`, passes the wake on to the next queued call: when it took its
    /// permit and a backend calls queue on still has room (the permit that came back may not be
    /// the only one), or when it fails (its wake must not be lost with it). A wake that finds
    /// no room would only send that call to the back of the line, so a returned permit wakes
    /// one queued call, not all of them.
    ///
    /// [`next`]: Self::next
    pub fn passes_wake_on(&self, next: &Next, now: Instant) -> bool {
        match next {
            Next::Send(_) => self.queued_have_room(now),
            Next::Fail(_) => self.has_queued(),
            Next::Wait(_) | Next::Queue(_) => false,
        }
    }

    /// The support record of the latest 403 block of backend `id`'s resource, if it had one.
    pub fn block_record(&self, id: BackendId) -> Option<Arc<SupportRecord>> {
        self.router.block_record(id)
    }

    /// The router's counters (calls, attempts, hedges, cancellations, waits).
    pub fn route_stats(&self) -> RouteStats {
        self.router.stats()
    }

    /// Retries the shared budget still allows at `now`.
    pub fn budget_remaining(&self, now: Instant) -> u32 {
        self.budget.remaining(now)
    }

    /// Opens a call at `now` for a request with this body; `deadline` is the caller's own.
    pub fn start(&mut self, now: Instant, body: &[u8], deadline: Option<Instant>) -> EngineCall {
        let tokens = self.tokens.estimate(body);
        self.start_estimated(now, tokens, deadline)
    }

    /// [`start`](Self::start) for a request whose tokens the driver already estimated (with
    /// [`token_estimator`](Self::token_estimator), outside a lock, or from its own figure).
    pub fn start_estimated(
        &mut self,
        now: Instant,
        tokens: u64,
        deadline: Option<Instant>,
    ) -> EngineCall {
        let retry = self.retry.start(now, deadline, &mut self.budget);
        let route = self.router.start(now, retry.deadline());
        EngineCall {
            retry,
            route,
            tokens,
            not_before: None,
            queued_since: None,
            sent: 0,
            last_outcome: None,
            avoid: None,
            origin: None,
            queued_on: None,
            racing: 0,
        }
    }

    /// Ends a call that stops asking [`next`](Self::next) (it returned, failed, or was dropped):
    /// it leaves the wait queue if it was in it. Idempotent.
    pub fn forget(&mut self, call: &mut EngineCall) {
        if let Some(id) = call.queued_on.take() {
            let n = &mut self.queued[id.index()];
            *n = n.saturating_sub(1);
        }
    }

    /// What the call does next at `now`.
    pub fn next(&mut self, call: &mut EngineCall, now: Instant) -> Next {
        // A call is in the queue exactly while its latest answer is `Queue`.
        self.forget(call);
        if call.retry.remaining(now).is_some_and(|left| left.is_zero()) {
            return Next::Fail(Failure::DeadlineExceeded);
        }
        if let Some(at) = call.not_before.filter(|at| *at > now) {
            return Next::Wait(at - now);
        }
        call.not_before = None;
        let tokens = call.tokens;
        let avoid = call.avoid;
        let (limits, pacers) = (&self.limits, &self.pacers);
        let headroom = |id: BackendId| {
            if Some(id) == avoid {
                0.0
            } else if pacers[id.index()].wait(now, tokens).is_zero() {
                f64::from(limits[id.index()].available(now))
            } else {
                0.0
            }
        };
        let id = match self.router.pick(&call.route, now, &headroom, &mut self.rng) {
            Pick::Send(id) => id,
            Pick::Wait(at) => return Next::Wait(at.saturating_duration_since(now)),
            Pick::GiveUp(none) => {
                return Next::Fail(match none.blocked {
                    Some(record) => Failure::Blocked(record),
                    None => Failure::NoBackend,
                });
            }
        };
        let pace = self.pacers[id.index()].wait(now, tokens);
        if !pace.is_zero() {
            return Next::Wait(self.capped(call, now, pace));
        }
        // First come, first served: a new call does not take a permit that came back to calls
        // queued on this backend (the first of them was woken for it).
        let behind_the_line = self.queued[id.index()] > 0 && call.queued_since.is_none();
        let permit = if behind_the_line {
            None
        } else {
            self.limits[id.index()].try_acquire(now, tokens)
        };
        let Some(permit) = permit else {
            let since = *call.queued_since.get_or_insert(now);
            let waited = now.saturating_duration_since(since);
            if waited >= self.queue_timeout {
                return Next::Fail(Failure::Overloaded);
            }
            let left = self.queue_timeout - waited;
            call.queued_on = Some(id);
            self.queued[id.index()] += 1;
            return Next::Queue(self.capped(call, now, left.min(QUEUE_RECHECK)));
        };
        call.queued_since = None;
        call.avoid = None;
        call.racing = 1;
        // Pacing said zero wait above, so this records the send.
        let _ = self.pacers[id.index()].check(now, tokens);
        self.router.on_send(&mut call.route, id, now);
        call.sent += 1;
        Next::Send(Ticket {
            backend: id,
            permit,
            sent_at: now,
            retry: call.sent > 1,
            hedge: false,
        })
    }

    /// How long to let the attempt `primary` run before hedging it, if the call is hedged at
    /// all: the router's hedge delay (a latency quantile of the backends), `None` when hedging is
    /// off, the latency history is too short, or the call was already hedged.
    pub fn hedge_delay(
        &self,
        call: &EngineCall,
        primary: BackendId,
        now: Instant,
    ) -> Option<Duration> {
        let delay = self.router.hedge_delay(&call.route, primary, now)?;
        match call.retry.remaining(now) {
            // A hedge that could not be sent before the deadline is no hedge.
            Some(left) if left <= delay => None,
            _ => Some(delay),
        }
    }

    /// A hedge of the attempt to `primary`, still running at `now`: a second attempt to a
    /// *different* usable backend with room now, if the hedge budget allows one. The first
    /// successful answer of the two wins; cancel the other ([`on_cancel`](Self::on_cancel)).
    ///
    /// While both run, an attempt that fails is answered [`After::Retry`] without spending an
    /// attempt of the call: wait for the other one, whose outcome gets the call's decision.
    pub fn hedge(
        &mut self,
        call: &mut EngineCall,
        primary: BackendId,
        now: Instant,
    ) -> Option<Ticket> {
        if call.retry.remaining(now).is_some_and(|left| left.is_zero()) {
            return None;
        }
        let tokens = call.tokens;
        let (limits, pacers) = (&self.limits, &self.pacers);
        let headroom = |id: BackendId| {
            if pacers[id.index()].wait(now, tokens).is_zero() {
                f64::from(limits[id.index()].available(now))
            } else {
                0.0
            }
        };
        let id = self
            .router
            .pick_hedge(&mut call.route, primary, now, &headroom, &mut self.rng)?;
        let permit = self.limits[id.index()].try_acquire(now, tokens)?;
        let _ = self.pacers[id.index()].check(now, tokens);
        self.router.on_send(&mut call.route, id, now);
        call.sent += 1;
        call.racing = 2;
        Some(Ticket {
            backend: id,
            permit,
            sent_at: now,
            retry: false,
            hedge: true,
        })
    }

    /// Feeds the response of the attempt `ticket`; `body` is the start of an error body (read it
    /// when [`classify::needs_body`] says so), `None` for a success. The attempt's permit goes
    /// back now, whatever the outcome.
    #[allow(clippy::too_many_arguments)]
    pub fn on_response(
        &mut self,
        call: &mut EngineCall,
        ticket: Ticket,
        status: StatusCode,
        headers: &HeaderMap,
        body: Option<&[u8]>,
        now: Instant,
        wall_now: SystemTime,
    ) -> After {
        let (after, lease) =
            self.respond(call, ticket, status, headers, body, now, wall_now, false);
        debug_assert!(lease.is_none());
        after
    }

    /// [`on_response`](Self::on_response) for a driver that hands a success's body up as a
    /// stream: a success keeps its permit in the returned [`Lease`] until the body ends
    /// ([`end_body`](Self::end_body)), as the limit layer's body does; any other outcome gives
    /// it back now (a failure is over when its headers arrive) and returns no lease.
    #[allow(clippy::too_many_arguments)]
    pub fn on_response_streamed(
        &mut self,
        call: &mut EngineCall,
        ticket: Ticket,
        status: StatusCode,
        headers: &HeaderMap,
        body: Option<&[u8]>,
        now: Instant,
        wall_now: SystemTime,
    ) -> (After, Option<Lease>) {
        self.respond(call, ticket, status, headers, body, now, wall_now, true)
    }

    /// Gives back the permit of a success whose body ended at `now`, as `end` says.
    pub fn end_body(&mut self, lease: Lease, end: BodyEnd, now: Instant) {
        let limit = &mut self.limits[lease.backend.index()];
        match end {
            BodyEnd::Finished => {
                limit.on_outcome(lease.permit, Outcome::Success, now);
            }
            BodyEnd::Failed => {
                limit.on_outcome(
                    lease.permit,
                    Outcome::Transient(super::TransientKind::Connect),
                    now,
                );
                // The backend's breaker learns it too: a region that resets its streams after
                // the headers is failing, though each attempt's headers said success.
                self.router.on_body_failed(lease.backend, now);
            }
            BodyEnd::Dropped => limit.on_cancel(lease.permit, now),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn respond(
        &mut self,
        call: &mut EngineCall,
        ticket: Ticket,
        status: StatusCode,
        headers: &HeaderMap,
        body: Option<&[u8]>,
        now: Instant,
        wall_now: SystemTime,
        lease: bool,
    ) -> (After, Option<Lease>) {
        let class = classify::classify_response(status, headers, body, wall_now);
        let id = ticket.backend;
        let mut kept = None;
        // Found once, for the pacer and the stats.
        let found = RateLimitHeaders::find(headers);
        self.pacers[id.index()].on_found(now, ticket.sent_at, &found);
        if class.outcome.is_throttle() {
            // A quota (or unexplained) 429's hint holds every send to this backend, not just this
            // call's; the limit measures idleness from the end of that hold, not from now.
            let hint = class.hint.map(|h| h.delay);
            if let Some(until) = self.pacers[id.index()].on_throttle(now, class.outcome, hint) {
                self.limits[id.index()].on_server_hold(until);
            }
        }
        if class.outcome == Outcome::Blocked {
            let b = self.router.backends().get(id);
            let resource = self.router.backends().resource(id);
            let host = match (&call.origin, self.passthrough) {
                (Some(origin), true) => origin.as_str(),
                _ => self.router.backends().resource_host(resource),
            };
            let record = SupportRecord::new(
                b.name(),
                host,
                b.deployment(),
                b.region(),
                status,
                headers,
                body.unwrap_or_default(),
                wall_now,
            );
            self.stats.record_block(record.clone());
            self.observe(&ticket, &class, Some((headers, &found)), now, wall_now);
            self.limits[id.index()].on_cancel(ticket.permit, now);
            self.router.on_blocked(id, record, now);
        } else {
            self.observe(&ticket, &class, Some((headers, &found)), now, wall_now);
            let latency = now.saturating_duration_since(ticket.sent_at);
            if ticket.hedge && class.outcome == Outcome::Success {
                let name = self.router.backends().get(id).name().to_owned();
                self.stats.record_hedge_win(&name);
            }
            if lease && class.outcome == Outcome::Success {
                kept = Some(Lease {
                    backend: id,
                    permit: ticket.permit,
                });
            } else {
                self.limits[id.index()].on_outcome(ticket.permit, class.outcome, now);
            }
            self.router
                .on_response(id, &class, latency, now, &mut self.rng);
        }
        (self.after(call, id, class, now), kept)
    }

    /// Feeds a transport error (no response) of the attempt `ticket`.
    pub fn on_error(
        &mut self,
        call: &mut EngineCall,
        ticket: Ticket,
        error: TransportError,
        now: Instant,
        wall_now: SystemTime,
    ) -> After {
        let class = classify::classify_error(error);
        let id = ticket.backend;
        self.observe(&ticket, &class, None, now, wall_now);
        let latency = now.saturating_duration_since(ticket.sent_at);
        self.limits[id.index()].on_outcome(ticket.permit, class.outcome, now);
        self.router
            .on_response(id, &class, latency, now, &mut self.rng);
        self.after(call, id, class, now)
    }

    /// Returns the permit of an attempt that ended without an outcome (cancelled, dropped).
    pub fn on_cancel(&mut self, ticket: Ticket, now: Instant) {
        self.limits[ticket.backend.index()].on_cancel(ticket.permit, now);
        self.router.on_cancel(ticket.backend);
    }

    /// The statistics, with the limiter's and router's gauges as of `now`.
    pub fn stats(&mut self, now: Instant, wall_now: SystemTime) -> &Stats {
        for id in self.router.backends().ids() {
            let limit = &self.limits[id.index()];
            let gauges = Gauges {
                limit: Some(limit.limit_at(now)),
                in_flight: limit.in_flight(),
                queue_depth: self.queued[id.index()],
                ..stats::router_gauges(&self.router, id, now, wall_now)
            };
            let name = self.router.backends().get(id).name().to_owned();
            self.stats.set_gauges(&name, gauges);
        }
        &self.stats
    }

    /// The diagnosis of what was observed so far.
    pub fn diagnose(&mut self, now: Instant, wall_now: SystemTime) -> Diagnosis {
        diagnose::diagnose(self.stats(now, wall_now))
    }

    fn observe(
        &mut self,
        ticket: &Ticket,
        class: &Classification,
        response: Option<(&HeaderMap, &RateLimitHeaders<'_>)>,
        now: Instant,
        wall_now: SystemTime,
    ) {
        let backend = self.router.backends().get(ticket.backend);
        let attempt = Attempt {
            backend: backend.name(),
            region: backend.region(),
            class,
            headers: response.map(|(headers, _)| headers),
            latency: Some(now.saturating_duration_since(ticket.sent_at)),
            retry: ticket.retry,
            hedge: ticket.hedge,
            wall_now,
        };
        if let Some(observer) = &self.observer {
            (observer.0)(&attempt);
        }
        self.stats
            .record_found(attempt, response.map(|(_, found)| found));
    }

    /// The retry decision after an attempt to `failed`, given that a failover needs no wait.
    fn after(
        &mut self,
        call: &mut EngineCall,
        failed: BackendId,
        class: Classification,
        now: Instant,
    ) -> After {
        call.last_outcome = Some(class.outcome);
        if call.racing > 1 && class.outcome != Outcome::Success {
            // The other attempt of a hedged call still runs: the call waits for it.
            call.racing -= 1;
            return After::Retry;
        }
        if class.outcome == Outcome::Success || !class.retryable {
            // A 403 block is not retryable on its resource, but another resource may serve.
            if class.outcome != Outcome::Blocked || !self.other_usable(failed, now) {
                return After::Return;
            }
        }
        let other = self.other_usable(failed, now);
        // Moving to another backend waits for nothing, so the failed backend's hint is no reason
        // to stop; attempts, deadline and budget still bound the call.
        let mut decided = class;
        if other {
            decided.hint = None;
            decided.retryable = true;
        }
        let action = self.retry.on_attempt(
            &mut call.retry,
            &decided,
            now,
            &mut self.budget,
            &mut self.rng,
        );
        let after = match action {
            Action::Retry { after, .. } => after,
            Action::GiveUp(reason) => return After::GiveUp(reason),
            _ => return After::Return,
        };
        if other {
            call.avoid = Some(failed);
            return After::Retry;
        }
        // Only the failed backend (or none) could take the next attempt.
        match self.router.availability(failed, now) {
            Availability::Usable => {
                // It failed without cooling down (a 5xx or a connection error without a hint):
                // back off before trying it again.
                call.not_before = now.checked_add(after);
                After::Retry
            }
            _ => {
                // It is out (cooldown from the server's hint, breaker, block): the next attempt
                // waits for the first backend to come back, if that is within the deadline.
                let next = self
                    .router
                    .backends()
                    .ids()
                    .map(|id| match self.router.availability(id, now) {
                        Availability::Usable | Availability::Probing => now,
                        Availability::CoolingDown(at)
                        | Availability::BreakerOpen(at)
                        | Availability::Blocked(at) => at,
                    })
                    .min();
                match (next, call.retry.deadline()) {
                    (Some(at), Some(deadline)) if at > deadline => {
                        After::GiveUp(GiveUpReason::DeadlineExceeded)
                    }
                    (Some(at), _) if at.saturating_duration_since(now) > self.retry.max_wait() => {
                        After::GiveUp(GiveUpReason::HintTooLong)
                    }
                    (None, _) => After::GiveUp(GiveUpReason::DeadlineExceeded),
                    _ => After::Retry,
                }
            }
        }
    }

    fn other_usable(&self, failed: BackendId, now: Instant) -> bool {
        self.router
            .backends()
            .ids()
            .any(|id| id != failed && self.router.availability(id, now) == Availability::Usable)
    }

    fn capped(&self, call: &EngineCall, now: Instant, wait: Duration) -> Duration {
        call.retry
            .remaining(now)
            .map_or(wait, |left| wait.min(left.max(Duration::from_millis(1))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUOTA: &[u8] = br#"{"error":{"code":"429","message":"Requests have exceeded token rate limit of your current OpenAI S0 pricing tier."}}"#;
    const BLOCKED: &[u8] = br#"{"error":{"code":"Forbidden","message":"Your resource has been temporarily blocked because we detected unusual behavior."}}"#;

    fn wall() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000)
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    fn engine(backends: Option<Vec<Backend>>) -> Engine {
        let config = EngineConfig {
            seed: Some(7),
            ..EngineConfig::default()
        };
        Engine::new(backends.map(|b| Backends::new(b).unwrap()), config).unwrap()
    }

    fn two_regions() -> Vec<Backend> {
        vec![
            Backend::new("east", "https://east.example.com")
                .with_region("eastus2")
                .with_api_key("k1"),
            Backend::new("west", "https://west.example.com")
                .with_region("westeurope")
                .with_api_key("k2"),
        ]
    }

    fn send(engine: &mut Engine, call: &mut EngineCall, now: Instant) -> Ticket {
        match engine.next(call, now) {
            Next::Send(t) => t,
            other => panic!("expected a send, got {other:?}"),
        }
    }

    #[test]
    fn passthrough_honours_the_hint_then_succeeds() {
        let mut e = engine(None);
        let t0 = Instant::now();
        let mut call = e.start(t0, b"{}", None);
        let ticket = send(&mut e, &mut call, t0);
        let h = headers(&[("retry-after-ms", "2000")]);
        let after = e.on_response(
            &mut call,
            ticket,
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            Some(QUOTA),
            t0,
            wall(),
        );
        assert_eq!(after, After::Retry);
        let Next::Wait(wait) = e.next(&mut call, t0) else {
            panic!("expected a wait");
        };
        assert!(wait >= Duration::from_secs(2), "{wait:?}");
        let t1 = t0 + wait;
        let ticket = send(&mut e, &mut call, t1);
        let after = e.on_response(
            &mut call,
            ticket,
            StatusCode::OK,
            &HeaderMap::new(),
            None,
            t1,
            wall(),
        );
        assert_eq!(after, After::Return);
        let stats = e.stats(t1, wall());
        let b = stats.backend(PASSTHROUGH_BACKEND).unwrap();
        assert_eq!((b.requests, b.successes, b.retries), (2, 1, 1));
        assert_eq!(b.throttled.quota, 1);
    }

    #[test]
    fn a_429_fails_over_without_waiting() {
        let mut e = engine(Some(two_regions()));
        let t0 = Instant::now();
        let mut call = e.start(t0, b"{}", None);
        let first = send(&mut e, &mut call, t0);
        let first_id = first.backend();
        let h = headers(&[("retry-after", "30")]);
        let after = e.on_response(
            &mut call,
            first,
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            Some(QUOTA),
            t0,
            wall(),
        );
        assert_eq!(after, After::Retry, "a 30 s hint must not stop a failover");
        let second = send(&mut e, &mut call, t0);
        assert_ne!(second.backend(), first_id);
        e.on_cancel(second, t0);
    }

    #[test]
    fn a_403_isolates_its_resource_and_the_last_one_returns_the_real_answer() {
        let mut e = engine(Some(two_regions()));
        let t0 = Instant::now();
        let h = headers(&[
            ("apim-request-id", "f6501a03"),
            ("x-ms-region", "East US 2"),
        ]);
        let mut call = e.start(t0, b"{}", None);
        let first = send(&mut e, &mut call, t0);
        let first_id = first.backend();
        let after = e.on_response(
            &mut call,
            first,
            StatusCode::FORBIDDEN,
            &h,
            Some(BLOCKED),
            t0,
            wall(),
        );
        assert_eq!(after, After::Retry);
        let second = send(&mut e, &mut call, t0);
        assert_ne!(second.backend(), first_id);
        // The other resource is blocked too: the 403 itself is the answer.
        let after = e.on_response(
            &mut call,
            second,
            StatusCode::FORBIDDEN,
            &h,
            Some(BLOCKED),
            t0,
            wall(),
        );
        assert_eq!(after, After::Return);
        // A new call finds nothing to send to, and gets the support record.
        let mut call = e.start(t0, b"{}", None);
        match e.next(&mut call, t0) {
            Next::Fail(Failure::Blocked(record)) => {
                assert_eq!(record.apim_request_id.as_deref(), Some("f6501a03"))
            }
            other => panic!("expected a blocked failure, got {other:?}"),
        }
        let d = e.diagnose(t0, wall());
        assert_eq!(
            d.findings
                .iter()
                .filter(|f| f.kind == diagnose::FindingKind::Blocked)
                .count(),
            2
        );
    }

    #[test]
    fn a_5xx_without_hint_backs_off_on_the_only_backend() {
        let mut e = engine(None);
        let t0 = Instant::now();
        let mut call = e.start(t0, b"{}", None);
        let ticket = send(&mut e, &mut call, t0);
        let after = e.on_error(&mut call, ticket, TransportError::Connect, t0, wall());
        assert_eq!(after, After::Retry);
        match e.next(&mut call, t0) {
            Next::Wait(d) => assert!(d <= Duration::from_millis(500)),
            Next::Send(t) => e.on_cancel(t, t0), // full jitter may draw zero
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_call_keeps_its_last_outcome_and_the_budget_is_visible() {
        let mut e = engine(None);
        let t0 = Instant::now();
        let mut call = e.start(t0, b"{}", None);
        assert_eq!(call.last_outcome(), None);
        let before = e.budget_remaining(t0);
        let ticket = send(&mut e, &mut call, t0);
        let after = e.on_error(&mut call, ticket, TransportError::Connect, t0, wall());
        assert_eq!(after, After::Retry);
        assert_eq!(
            call.last_outcome(),
            Some(Outcome::Transient(crate::policy::TransientKind::Connect))
        );
        assert_eq!(e.budget_remaining(t0), before - 1);
    }

    #[test]
    fn a_5xx_on_the_best_tier_fails_over_to_the_next_tier_at_once() {
        let mut backends = two_regions();
        backends[1] = backends[1].clone().with_tier(1);
        let mut e = engine(Some(backends));
        let t0 = Instant::now();
        let mut call = e.start(t0, b"{}", None);
        let first = send(&mut e, &mut call, t0);
        assert_eq!(e.backends().get(first.backend()).name(), "east");
        let after = e.on_response(
            &mut call,
            first,
            StatusCode::INTERNAL_SERVER_ERROR,
            &HeaderMap::new(),
            Some(b"{}"),
            t0,
            wall(),
        );
        assert_eq!(after, After::Retry);
        // East is still usable (no hint, breaker closed) but the call moves on, without a wait.
        let second = send(&mut e, &mut call, t0);
        assert_eq!(e.backends().get(second.backend()).name(), "west");
        e.on_cancel(second, t0);
    }

    #[test]
    fn a_passthrough_block_names_the_requests_host() {
        let h = headers(&[("apim-request-id", "p-1")]);
        for (backends, origin, expected) in [
            (None, "myres.openai.azure.com", "myres.openai.azure.com"),
            (Some(two_regions()), "ignored.example", "east.example.com"),
        ] {
            let mut e = engine(backends);
            let t0 = Instant::now();
            let mut call = e.start(t0, b"{}", None);
            call.set_origin(origin);
            let ticket = send(&mut e, &mut call, t0);
            let first = e.backends().get(ticket.backend()).name().to_owned();
            e.on_response(
                &mut call,
                ticket,
                StatusCode::FORBIDDEN,
                &h,
                Some(BLOCKED),
                t0,
                wall(),
            );
            let record = e.stats(t0, wall()).blocks().last().unwrap().clone();
            let expected = if first == "west" && expected == "east.example.com" {
                "west.example.com"
            } else {
                expected
            };
            assert_eq!(record.resource, expected);
        }
    }

    #[test]
    fn a_hint_past_the_deadline_gives_up_with_the_response() {
        let mut e = engine(None);
        let t0 = Instant::now();
        let mut call = e.start(t0, b"{}", Some(t0 + Duration::from_secs(5)));
        let ticket = send(&mut e, &mut call, t0);
        let h = headers(&[("retry-after", "20")]);
        let after = e.on_response(
            &mut call,
            ticket,
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            Some(QUOTA),
            t0,
            wall(),
        );
        assert_eq!(after, After::GiveUp(GiveUpReason::DeadlineExceeded));
    }

    #[test]
    fn calls_queue_at_the_limit_and_time_out_as_overloaded() {
        let config = EngineConfig {
            limit: LimitConfig::default().with_initial(2).with_max(2),
            queue_timeout: Duration::from_secs(3),
            seed: Some(1),
            ..EngineConfig::default()
        };
        let mut e = Engine::new(None, config).unwrap();
        let t0 = Instant::now();
        let mut a = e.start(t0, b"{}", None);
        let mut b = e.start(t0, b"{}", None);
        let mut c = e.start(t0, b"{}", None);
        let ta = send(&mut e, &mut a, t0);
        let _tb = send(&mut e, &mut b, t0);
        assert!(matches!(e.next(&mut c, t0), Next::Queue(_)));
        // A permit comes back: the queued call goes.
        e.on_cancel(ta, t0);
        let tc = send(&mut e, &mut c, t0 + Duration::from_millis(10));
        // Now full again; a fourth call waits, then gives up after the queue timeout.
        let mut d = e.start(t0, b"{}", None);
        assert!(matches!(e.next(&mut d, t0), Next::Queue(_)));
        assert!(matches!(
            e.next(&mut d, t0 + Duration::from_secs(3)),
            Next::Fail(Failure::Overloaded)
        ));
        e.on_cancel(tc, t0);
    }

    /// The Python binding passes a response other than a 403 with only the headers of
    /// [`headers::READ`](super::super::headers::READ): the engine must decide, count and diagnose
    /// exactly as with every header, whatever the status.
    #[test]
    fn only_the_read_headers_matter_except_for_a_block() {
        use crate::policy::headers::is_read;
        const CAPACITY: &[u8] =
            br#"{"error":{"code":"429","message":"The service is under high demand."}}"#;
        // Says nothing of its cause: only the headers can.
        const PLAIN: &[u8] = br#"{"error":{"code":"429","message":"Too many requests."}}"#;
        let noise = [
            ("content-type", "application/json"),
            ("date", "Sun, 22 Nov 2026 14:00:00 GMT"),
            ("x-ms-client-request-id", "c1"),
            ("strict-transport-security", "max-age=31536000"),
            ("azureml-model-session", "d1"),
        ];
        let success = [
            ("x-ratelimit-remaining-requests", "99"),
            ("x-ratelimit-remaining-tokens", "9000"),
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-limit-tokens", "10000"),
            ("x-ms-region", "East US 2"),
            ("apim-request-id", "a1"),
            ("x-request-id", "r1"),
        ];
        // (status, read headers, body): each outcome the classifier knows.
        type Answer = (
            u16,
            Vec<(&'static str, &'static str)>,
            Option<&'static [u8]>,
        );
        let answers: [Answer; 11] = [
            (200, success.to_vec(), None),
            (
                429,
                vec![
                    ("retry-after-ms", "1500"),
                    ("policy-id", "DeploymentRatelimit-Token"),
                ],
                Some(PLAIN),
            ),
            (429, vec![("retry-after", "2")], Some(CAPACITY)),
            (
                429,
                vec![
                    ("azure-openai-deployment-utilization", "100%"),
                    ("retry-after-ms", "40"),
                ],
                Some(PLAIN),
            ),
            (
                429,
                vec![
                    ("x-ratelimit-reset-requests", "30s"),
                    ("x-ratelimit-reset-tokens", "1s"),
                    ("x-rate-limit-reset-tokens", "2"),
                ],
                Some(CAPACITY),
            ),
            (
                429,
                vec![("x-ratelimit-reset-tokens", "25s")],
                Some(CAPACITY),
            ),
            (
                429,
                vec![("x-rate-limit-reset-tokens", "20")],
                Some(CAPACITY),
            ),
            (
                503,
                vec![("retry-after", "1"), ("x-should-retry", "true")],
                Some(b"{}"),
            ),
            (500, vec![("x-should-retry", "false")], Some(b"{}")),
            (408, vec![], Some(b"{}")),
            (403, vec![("x-ms-region", "East US 2")], Some(BLOCKED)),
        ];
        let backends = || {
            let mut b = two_regions();
            b.push(Backend::new("third", "https://third.example.com").with_api_key("k3"));
            Some(b)
        };
        let (mut whole, mut read) = (engine(backends()), engine(backends()));
        let t0 = Instant::now();
        let mut now = t0;
        for round in 0..3 {
            for (status, named, body) in &answers {
                let mut all = HeaderMap::new();
                for (k, v) in named.iter().chain(&noise) {
                    all.append(*k, http::HeaderValue::from_str(v).unwrap());
                }
                let status = StatusCode::from_u16(*status).unwrap();
                let mut some = all.clone();
                if !classify::needs_all_headers(status) {
                    some = all
                        .iter()
                        .filter(|(k, _)| is_read(k.as_str().as_bytes()))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    assert!(some.len() < all.len());
                }
                let mut calls = (whole.start(now, b"{}", None), read.start(now, b"{}", None));
                let (a, b) = (whole.next(&mut calls.0, now), read.next(&mut calls.1, now));
                assert_eq!(
                    format!("{a:?}"),
                    format!("{b:?}"),
                    "round {round}, {status}"
                );
                let (Next::Send(ta), Next::Send(tb)) = (a, b) else {
                    now += Duration::from_secs(30);
                    continue;
                };
                let after = (
                    whole.on_response(&mut calls.0, ta, status, &all, *body, now, wall()),
                    read.on_response(&mut calls.1, tb, status, &some, *body, now, wall()),
                );
                assert_eq!(after.0, after.1, "round {round}, {status}");
                let next = (whole.next(&mut calls.0, now), read.next(&mut calls.1, now));
                assert_eq!(
                    format!("{:?}", next.0),
                    format!("{:?}", next.1),
                    "round {round}"
                );
                if let (Next::Send(a), Next::Send(b)) = next {
                    whole.on_cancel(a, now);
                    read.on_cancel(b, now);
                }
                if calls.0.is_queued() {
                    whole.forget(&mut calls.0);
                    read.forget(&mut calls.1);
                }
                // The gauges too (cooldowns, pacing), as of now.
                assert_eq!(
                    format!("{:?}", whole.stats(now, wall())),
                    format!("{:?}", read.stats(now, wall())),
                    "round {round}, {status}"
                );
                now += Duration::from_millis(700);
            }
        }
        assert_eq!(
            format!("{:?}", whole.stats(now, wall())),
            format!("{:?}", read.stats(now, wall()))
        );
        assert_eq!(whole.diagnose(now, wall()), read.diagnose(now, wall()));
        // The block's record kept every header but secrets.
        let stats = whole.stats(now, wall());
        let record = format!("{:?}", stats.blocks().last().expect("a block"));
        assert!(record.contains("azureml-model-session"), "{record}");
    }

    fn ok(e: &mut Engine, call: &mut EngineCall, ticket: Ticket, now: Instant) -> After {
        e.on_response(
            call,
            ticket,
            StatusCode::OK,
            &HeaderMap::new(),
            None,
            now,
            wall(),
        )
    }

    fn gauges(e: &mut Engine, now: Instant) -> (u32, u32) {
        let stats = e.stats(now, wall());
        let g = &stats.backend(PASSTHROUGH_BACKEND).unwrap().gauges;
        (g.in_flight, g.queue_depth)
    }

    #[test]
    fn a_streamed_success_holds_its_permit_until_the_body_ends() {
        let config = EngineConfig {
            limit: LimitConfig::default().with_initial(1).with_max(1),
            seed: Some(3),
            ..EngineConfig::default()
        };
        let mut e = Engine::new(None, config).unwrap();
        let t0 = Instant::now();
        let mut a = e.start(t0, b"{}", None);
        let ticket = send(&mut e, &mut a, t0);
        let (after, lease) = e.on_response_streamed(
            &mut a,
            ticket,
            StatusCode::OK,
            &HeaderMap::new(),
            None,
            t0,
            wall(),
        );
        assert_eq!(after, After::Return);
        let lease = lease.expect("a success keeps its permit");
        // Headers are in, the body streams: the slot is still taken.
        assert_eq!(gauges(&mut e, t0), (1, 0));
        let mut b = e.start(t0, b"{}", None);
        assert!(matches!(e.next(&mut b, t0), Next::Queue(_)));
        assert!(b.is_queued());
        assert_eq!(gauges(&mut e, t0), (1, 1));
        let t1 = t0 + Duration::from_secs(2);
        e.end_body(lease, BodyEnd::Finished, t1);
        assert_eq!(gauges(&mut e, t1), (0, 1));
        // The round trip is measured to the body's end, as the limit layer does.
        assert_eq!(e.limits[0].srtt(), Some(Duration::from_secs(2)));
        let tb = send(&mut e, &mut b, t1);
        assert!(!b.is_queued());
        assert_eq!(gauges(&mut e, t1), (1, 0));
        let (_, lease) = e.on_response_streamed(
            &mut b,
            tb,
            StatusCode::OK,
            &HeaderMap::new(),
            None,
            t1,
            wall(),
        );
        e.end_body(lease.unwrap(), BodyEnd::Dropped, t1);
        assert_eq!(gauges(&mut e, t1), (0, 0));
    }

    #[test]
    fn streams_that_break_after_their_headers_open_the_backends_breaker() {
        let mut e = engine(Some(two_regions()));
        let t0 = Instant::now();
        let mut broke_on = Vec::new();
        // Every stream from "west" breaks after its headers; "east" streams to the end.
        for i in 0..40u64 {
            let at = t0 + Duration::from_millis(10 * i);
            let mut call = e.start(at, b"{}", None);
            let ticket = send(&mut e, &mut call, at);
            let id = ticket.backend();
            let (after, lease) = e.on_response_streamed(
                &mut call,
                ticket,
                StatusCode::OK,
                &HeaderMap::new(),
                None,
                at,
                wall(),
            );
            assert_eq!(after, After::Return);
            let west = e.backends().get(id).name() == "west";
            let end = if west {
                BodyEnd::Failed
            } else {
                BodyEnd::Finished
            };
            e.end_body(lease.unwrap(), end, at);
            if west {
                broke_on.push(i);
            }
        }
        let west = e.backends().find("west").unwrap();
        assert!(
            matches!(
                e.router.availability(west, t0 + Duration::from_millis(400)),
                Availability::BreakerOpen(_)
            ),
            "west's breaker is open after its streams broke at {broke_on:?}"
        );
        // Each broken stream counts a success (its headers) and a failure (its body): the
        // breaker opens at half of its 5 results, after 3 such streams, and no more go west.
        assert_eq!(broke_on.len(), 3, "{broke_on:?}");
    }

    #[test]
    fn a_streamed_failure_gives_its_permit_back_at_once() {
        let mut e = engine(None);
        let t0 = Instant::now();
        let mut call = e.start(t0, b"{}", None);
        let ticket = send(&mut e, &mut call, t0);
        let (after, lease) = e.on_response_streamed(
            &mut call,
            ticket,
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after-ms", "100")]),
            Some(QUOTA),
            t0,
            wall(),
        );
        assert_eq!(after, After::Retry);
        assert!(lease.is_none());
        assert_eq!(gauges(&mut e, t0).0, 0);
    }

    #[test]
    fn queue_depth_counts_exactly_the_calls_waiting() {
        let config = EngineConfig {
            limit: LimitConfig::default().with_initial(1).with_max(1),
            queue_timeout: Duration::from_secs(2),
            seed: Some(5),
            ..EngineConfig::default()
        };
        let mut e = Engine::new(None, config).unwrap();
        let t0 = Instant::now();
        let mut a = e.start(t0, b"{}", None);
        let ta = send(&mut e, &mut a, t0);
        let mut b = e.start(t0, b"{}", None);
        let mut c = e.start(t0, b"{}", None);
        let mut d = e.start(t0, b"{}", None);
        for call in [&mut b, &mut c, &mut d] {
            assert!(matches!(e.next(call, t0), Next::Queue(_)));
        }
        // Asking again while still at the limit does not count a call twice.
        assert!(matches!(e.next(&mut b, t0), Next::Queue(_)));
        assert_eq!(gauges(&mut e, t0).1, 3);
        // A call dropped while queued leaves (and forgetting it twice changes nothing).
        e.forget(&mut c);
        e.forget(&mut c);
        assert_eq!(gauges(&mut e, t0).1, 2);
        // A call that times out leaves.
        let t2 = t0 + Duration::from_secs(2);
        assert!(matches!(
            e.next(&mut d, t2),
            Next::Fail(Failure::Overloaded)
        ));
        assert_eq!(gauges(&mut e, t2).1, 1);
        // A call that gets its permit leaves.
        assert_eq!(ok(&mut e, &mut a, ta, t0), After::Return);
        let tb = send(&mut e, &mut b, t0);
        assert_eq!(gauges(&mut e, t0), (1, 0));
        e.on_cancel(tb, t0);
    }

    /// Two backends where `east` has answered 25 calls in 100 ms each and `west` 25 in 50 ms (the
    /// calls that picked a backend already warm are cancelled, so they leave no sample); and how
    /// many calls that took.
    fn warmed_up() -> (Engine, Instant, BackendId, BackendId, u32) {
        let mut e = engine(Some(two_regions()));
        let east = e.backends().find("east").unwrap();
        let west = e.backends().find("west").unwrap();
        let mut t = Instant::now();
        let mut seen = [0u32; 2];
        let mut calls = 0;
        while seen.iter().any(|&n| n < 25) {
            let mut call = e.start(t, b"{}", None);
            calls += 1;
            let ticket = send(&mut e, &mut call, t);
            let id = ticket.backend();
            if seen[id.index()] >= 25 {
                e.on_cancel(ticket, t);
                continue;
            }
            seen[id.index()] += 1;
            let took = if id == east { 100 } else { 50 };
            t += Duration::from_millis(took);
            assert_eq!(ok(&mut e, &mut call, ticket, t), After::Return);
        }
        (e, t, east, west, calls)
    }

    #[test]
    fn a_hedge_goes_to_another_backend_and_the_first_success_wins() {
        let (mut e, t, east, west, _) = warmed_up();
        let mut call = e.start(t, b"{}", None);
        let primary = loop {
            let ticket = send(&mut e, &mut call, t);
            if ticket.backend() == east {
                break ticket;
            }
            // Keep the test about a primary on the slow backend.
            e.on_cancel(ticket, t);
            call = e.start(t, b"{}", None);
        };
        let delay = e
            .hedge_delay(&call, east, t)
            .expect("enough history to hedge");
        // The faster backend's quantile bounds the wait.
        assert!(delay <= Duration::from_millis(60), "{delay:?}");
        let th = t + delay;
        let hedge = e
            .hedge(&mut call, east, th)
            .expect("the budget allows a hedge");
        assert_eq!(hedge.backend(), west);
        assert!(hedge.is_hedge());
        assert_eq!(call.attempts(), 2);
        // Once hedged, a call is not hedged again.
        assert_eq!(e.hedge_delay(&call, east, th), None);
        assert_eq!(ok(&mut e, &mut call, hedge, th), After::Return);
        e.on_cancel(primary, th);
        let stats = e.stats(th, wall());
        let w = stats.backend("west").unwrap();
        assert_eq!((w.hedges, w.hedge_wins), (1, 1));
        assert_eq!(stats.backend("east").unwrap().gauges.in_flight, 0);
        assert_eq!(stats.backend("west").unwrap().gauges.in_flight, 0);
    }

    #[test]
    fn a_failed_attempt_of_a_hedged_call_waits_for_the_other() {
        let (mut e, t, _, _, _) = warmed_up();
        let mut call = e.start(t, b"{}", None);
        let primary = send(&mut e, &mut call, t);
        let Some(hedge) = e.hedge(&mut call, primary.backend(), t) else {
            panic!("the budget allows a hedge");
        };
        assert_ne!(hedge.backend(), primary.backend());
        let budget = e.budget_remaining(t);
        let after = e.on_error(&mut call, primary, TransportError::Connect, t, wall());
        assert_eq!(after, After::Retry);
        // No retry was spent: the hedge still runs.
        assert_eq!(e.budget_remaining(t), budget);
        // The hedge fails too: now the call gets its real decision (a retry, budget spent).
        let after = e.on_error(&mut call, hedge, TransportError::Connect, t, wall());
        assert_eq!(after, After::Retry);
        assert_eq!(e.budget_remaining(t), budget - 1);
    }

    #[test]
    fn the_hedge_budget_bounds_hedges() {
        let (mut e, t, _, _, warm_up) = warmed_up();
        let mut hedges = 0;
        let calls = 40;
        for _ in 0..calls {
            let mut call = e.start(t, b"{}", None);
            let primary = send(&mut e, &mut call, t);
            if let Some(h) = e.hedge(&mut call, primary.backend(), t) {
                hedges += 1;
                e.on_cancel(h, t);
            }
            e.on_cancel(primary, t);
        }
        // At most 5 % of the calls in the window (the warm-up's included).
        let allowed = (f64::from(warm_up + calls) * 0.05).floor() as u32;
        assert!(
            (1..=allowed).contains(&hedges),
            "{hedges} hedges for {} calls",
            warm_up + calls
        );
    }

    /// Random interleavings of calls that stream, fail, hedge, queue and are dropped: the gauges
    /// always count exactly the permits held (tickets and leases) and the calls queued.
    #[test]
    fn permits_and_queue_depth_are_conserved() {
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let config = EngineConfig {
                limit: LimitConfig::default().with_initial(2).with_max(3),
                queue_timeout: Duration::from_secs(5),
                seed: Some(seed),
                ..EngineConfig::default()
            };
            let mut e = Engine::new(Some(Backends::new(two_regions()).unwrap()), config).unwrap();
            let mut t = Instant::now();
            let mut calls: Vec<EngineCall> = Vec::new();
            let mut tickets: Vec<(usize, Ticket)> = Vec::new();
            let mut leases: Vec<Lease> = Vec::new();
            for _ in 0..300 {
                t += Duration::from_millis(rng.u64(0..50));
                match rng.u8(0..7) {
                    0 | 1 => calls.push(e.start(t, b"{}", None)),
                    2 if !calls.is_empty() => {
                        let i = rng.usize(0..calls.len());
                        if let Next::Send(ticket) = e.next(&mut calls[i], t) {
                            if rng.bool() {
                                let primary = ticket.backend();
                                if let Some(h) = e.hedge(&mut calls[i], primary, t) {
                                    tickets.push((i, h));
                                }
                            }
                            tickets.push((i, ticket));
                        }
                    }
                    3 if !tickets.is_empty() => {
                        let (i, ticket) = tickets.swap_remove(rng.usize(0..tickets.len()));
                        let status = if rng.bool() {
                            StatusCode::OK
                        } else {
                            StatusCode::INTERNAL_SERVER_ERROR
                        };
                        let (_, lease) = e.on_response_streamed(
                            &mut calls[i],
                            ticket,
                            status,
                            &HeaderMap::new(),
                            Some(b"{}"),
                            t,
                            wall(),
                        );
                        leases.extend(lease);
                    }
                    4 if !tickets.is_empty() => {
                        let (_, ticket) = tickets.swap_remove(rng.usize(0..tickets.len()));
                        e.on_cancel(ticket, t);
                    }
                    5 if !leases.is_empty() => {
                        let lease = leases.swap_remove(rng.usize(0..leases.len()));
                        let end =
                            [BodyEnd::Finished, BodyEnd::Failed, BodyEnd::Dropped][rng.usize(0..3)];
                        e.end_body(lease, end, t);
                    }
                    6 if !calls.is_empty() => {
                        // A call abandoned (its tickets stay with the driver, which ends them).
                        let i = rng.usize(0..calls.len());
                        e.forget(&mut calls[i]);
                    }
                    _ => {}
                }
                let queued = calls.iter().filter(|c| c.is_queued()).count();
                let held = tickets.len() + leases.len();
                let stats = e.stats(t, wall());
                let (in_flight, depth) = ["east", "west"].iter().fold((0, 0), |acc, name| {
                    let g = &stats
                        .backend(name)
                        .map(|b| b.gauges.clone())
                        .unwrap_or_default();
                    (acc.0 + g.in_flight as usize, acc.1 + g.queue_depth as usize)
                });
                assert_eq!(in_flight, held, "seed {seed}");
                assert_eq!(depth, queued, "seed {seed}");
            }
        }
    }
}
