use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{Request, Response, StatusCode};
use http_body::Body;
use tokio::sync::Notify;
use tower::BoxError;
use tower_service::Service;

use super::body::LimitBody;
use super::layer::{AdaptiveConcurrencyLayer, Settings};
use crate::driver::{estimate_tokens, now, take_ready, transport_error};
use crate::future::ResponseFuture;
use crate::policy::classify::{self, TransientKind};
use crate::policy::{AdaptiveLimit, Outcome, Pacer, Permit};
use crate::retry::body::Classified;
use crate::retry::{Deadline, RetryBody};

/// The estimated tokens of a request, as a request extension. When present, the limiter uses it
/// instead of reading the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEstimate(pub u64);

/// Why the limiter refused to send a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OverloadReason {
    /// The wait queue was full.
    QueueFull,
    /// The call waited (for a permit, or for pacing) as long as the queue timeout allows.
    QueueTimeout,
    /// Waiting longer would pass the call's [`Deadline`].
    Deadline,
}

impl OverloadReason {
    /// A short stable name, for logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            OverloadReason::QueueFull => "queue_full",
            OverloadReason::QueueTimeout => "queue_timeout",
            OverloadReason::Deadline => "deadline",
        }
    }
}

/// The limiter refused to send a call: the backend is at its limit and the call could not wait.
/// Nothing was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded {
    /// Why the call could not wait.
    pub reason: OverloadReason,
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            OverloadReason::QueueFull => {
                f.write_str("the backend is at its limit and its wait queue is full")
            }
            OverloadReason::QueueTimeout => {
                f.write_str("the backend stayed at its limit for the whole queue timeout")
            }
            OverloadReason::Deadline => {
                f.write_str("the backend is at its limit past the call's deadline")
            }
        }
    }
}

impl std::error::Error for Overloaded {}

/// What a limiter is doing now, for stats, routing and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct LimiterSnapshot {
    /// Attempts that may be in flight.
    pub limit: u32,
    /// Attempts in flight (a streaming response counts until its body ends).
    pub in_flight: u32,
    /// Calls waiting for a permit.
    pub queued: usize,
    /// Throttling episodes answered so far (cuts).
    pub cuts: u64,
    /// The requests-per-minute quota paced against, if known.
    pub requests_per_minute: Option<f64>,
    /// The tokens-per-minute quota paced against, if known.
    pub tokens_per_minute: Option<f64>,
    /// How long every send is still held by a server hint.
    pub held_for: Option<Duration>,
}

/// A handle on one backend's limiter, shared by the service and its clones.
#[derive(Clone)]
pub struct LimiterHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for LimiterHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LimiterHandle")
            .field(&self.snapshot())
            .finish()
    }
}

impl LimiterHandle {
    /// What the limiter is doing now.
    pub fn snapshot(&self) -> LimiterSnapshot {
        let now = now();
        let state = self.shared.lock();
        LimiterSnapshot {
            limit: state.limit.limit_at(now),
            in_flight: state.limit.in_flight(),
            queued: state.queue.len(),
            cuts: state.limit.epoch(),
            requests_per_minute: state.pacer.requests_per_minute(),
            tokens_per_minute: state.pacer.tokens_per_minute(),
            held_for: state.pacer.held_until(now).map(|h| h - now),
        }
    }

    /// The share of the limit that is free now, for the router's headroom: 0 when a call sent
    /// now would wait (no permit free, someone queued, a pacing wait), else at least 0.01. One
    /// look at the limiter, where [`has_room`](Self::has_room) and
    /// [`snapshot`](Self::snapshot) would take two.
    pub fn room(&self) -> f64 {
        let now = now();
        let state = self.shared.lock();
        if !state.queue.is_empty()
            || state.limit.available(now) == 0
            || !state.pacer.wait(now, 0).is_zero()
        {
            return 0.0;
        }
        let limit = state.limit.limit_at(now).max(1);
        (f64::from(limit.saturating_sub(state.limit.in_flight())) / f64::from(limit)).max(0.01)
    }

    /// Whether a call sent now would start at once (a permit free, nobody queued, no pacing wait
    /// for an attempt of `tokens`): the router's "has room" input.
    pub fn has_room(&self, tokens: u64) -> bool {
        let now = now();
        let state = self.shared.lock();
        state.queue.is_empty()
            && state.limit.available(now) > 0
            && state.pacer.wait(now, tokens).is_zero()
    }
}

pub(super) struct State {
    limit: AdaptiveLimit,
    pacer: Pacer,
    /// The calls waiting for a permit, first come first served: each one's ticket and what wakes
    /// it.
    queue: VecDeque<(u64, Arc<Notify>)>,
    next_ticket: u64,
}

impl State {
    /// What wakes the first call in the queue, if any. Only the first may take a permit, so a
    /// returned permit wakes it alone (with thousands queued, waking all of them on every return
    /// would cost each a turn of the lock per permit). Its `notify_one` is kept if it is not
    /// waiting yet, so no wake is lost between its look for a permit and its wait.
    fn front(&self) -> Option<Arc<Notify>> {
        self.queue.front().map(|(_, wake)| wake.clone())
    }
}

pub(super) struct Shared {
    state: Mutex<State>,
    settings: Settings,
    /// Times a queued call was woken (what the tests count).
    #[cfg(test)]
    pub(super) wakeups: std::sync::atomic::AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Wakes the call that was first in the queue when a permit came back (read under that lock).
fn wake(front: Option<Arc<Notify>>) {
    if let Some(front) = front {
        front.notify_one();
    }
}

/// Limits and paces the attempts sent to one backend. See the [module docs](crate::limit).
#[derive(Clone)]
pub struct AdaptiveConcurrency<S> {
    inner: S,
    pub(super) shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for AdaptiveConcurrency<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveConcurrency")
            .field("inner", &self.inner)
            .field("limiter", &self.handle().snapshot())
            .finish()
    }
}

impl<S> AdaptiveConcurrency<S> {
    /// Wraps `inner` with the default limiter ([`AdaptiveConcurrencyLayer::default`]).
    pub fn new(inner: S) -> Self {
        tower_layer::Layer::layer(&AdaptiveConcurrencyLayer::default(), inner)
    }

    pub(super) fn from_settings(inner: S, settings: Settings) -> Self {
        let state = State {
            limit: settings.limit.clone(),
            pacer: settings.pacer.clone(),
            queue: VecDeque::new(),
            next_ticket: 0,
        };
        Self {
            inner,
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                settings,
                #[cfg(test)]
                wakeups: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// A handle on this backend's limiter (shared with every clone of this service).
    pub fn handle(&self) -> LimiterHandle {
        LimiterHandle {
            shared: self.shared.clone(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResBody> Service<Request<B>> for AdaptiveConcurrency<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + Clone + Send + 'static,
    B::Data: Buf + Send,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<LimitBody<RetryBody<ResBody>>>;
    type Error = BoxError;
    type Future = ResponseFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let ready = take_ready(&mut self.inner);
        ResponseFuture::new(run(ready, self.shared.clone(), req))
    }
}

// Not an `async fn`: see the note in `crate::future`.
#[allow(clippy::manual_async_fn)]
fn run<S, B, ResBody>(
    mut svc: S,
    shared: Arc<Shared>,
    req: Request<B>,
) -> impl Future<Output = Result<Response<LimitBody<RetryBody<ResBody>>>, BoxError>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    B: Body + Clone,
    B::Data: Buf,
    ResBody: Body<Data = Bytes> + Unpin,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let tokens = estimate_tokens(&shared.settings.estimator, req.extensions(), req.body());
        let start = now();
        let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        let (limit_at, reason_at_limit) = wait_limit(&shared, start, &req);
        // Waiting (in the queue, for pacing) is the exception: its futures are boxed when needed, so
        // the call's own future stays small for the common case that starts at once.
        let mut guard = match start_now(&shared, start, tokens) {
            Start::Now(guard) => guard,
            Start::Pace(guard) => {
                Box::pin(pace(&shared, tokens, limit_at, reason_at_limit)).await?;
                guard
            }
            Start::Queue => {
                Box::pin(async {
                    let guard = acquire(&shared, tokens, limit_at, reason_at_limit).await?;
                    pace(&shared, tokens, limit_at, reason_at_limit).await?;
                    Ok::<_, Overloaded>(guard)
                })
                .await?
            }
        };
        // The attempt starts now: its round trip is measured from here, not from the queue.
        guard.restamp(now());
        let result = svc.call(req).await.map_err(Into::into);
        let res = match result {
            Ok(res) => res,
            Err(e) => {
                guard.finish(classify::classify_error(transport_error(&*e)).outcome);
                return Err(e);
            }
        };
        let at = now();
        // A 429's cause decides whether every send waits (a quota) or not (regional capacity),
        // and only its body says which: its start is read (as the retry layer does), in a boxed
        // future, and replayed.
        let classified = if res.status() == StatusCode::TOO_MANY_REQUESTS {
            let remaining = deadline.map(|d| d.saturating_duration_since(at));
            match Box::pin(Classified::read(res, remaining)).await {
                Ok(c) => c,
                Err(e) => {
                    guard.finish(Outcome::Transient(TransientKind::Connect));
                    return Err(e);
                }
            }
        } else {
            Classified::unread(res)
        };
        let (res, class) = (classified.response, classified.class);
        {
            let mut state = shared.lock();
            state
                .pacer
                .on_response_to(at, guard.sent_at(at), res.headers());
            if class.outcome.is_throttle()
                && let Some(until) =
                    state
                        .pacer
                        .on_throttle(at, class.outcome, class.hint.map(|h| h.delay))
            {
                state.limit.on_server_hold(until);
            }
        }
        if class.outcome == Outcome::Success {
            // The service works on a success until its body ends: the body holds the permit.
            Ok(res.map(|body| LimitBody::new(body, Some(guard))))
        } else {
            // A failure is over when its headers arrive: count it now (a throttle cuts at once).
            guard.finish(class.outcome);
            Ok(res.map(|body| LimitBody::new(body, None)))
        }
    }
}

/// When waiting must stop, and what it is called when it does.
fn wait_limit<B>(shared: &Shared, now: Instant, req: &Request<B>) -> (Instant, OverloadReason) {
    let timeout = now + shared.settings.queue_timeout;
    match req.extensions().get::<Deadline>() {
        Some(Deadline(deadline)) if *deadline < timeout => (*deadline, OverloadReason::Deadline),
        _ => (timeout, OverloadReason::QueueTimeout),
    }
}

/// How a call can start.
enum Start {
    /// At once: a permit was free, nobody queued, no pacing wait.
    Now(PermitGuard),
    /// With a permit, after a pacing wait.
    Pace(PermitGuard),
    /// After a wait in the queue (then pacing).
    Queue,
}

/// The common case under one lock: a free permit with nobody queued ahead, and the pacer's leave.
fn start_now(shared: &Arc<Shared>, at: Instant, tokens: u64) -> Start {
    let mut state = shared.lock();
    if !state.queue.is_empty() {
        return Start::Queue;
    }
    let Some(permit) = state.limit.try_acquire(at, tokens) else {
        return Start::Queue;
    };
    let paced = state.pacer.check(at, tokens).is_ok();
    drop(state);
    let guard = PermitGuard::new(shared.clone(), permit);
    if paced {
        Start::Now(guard)
    } else {
        Start::Pace(guard)
    }
}

/// Waits for a permit, first come first served, until `limit_at`.
async fn acquire(
    shared: &Arc<Shared>,
    tokens: u64,
    limit_at: Instant,
    reason_at_limit: OverloadReason,
) -> Result<PermitGuard, Overloaded> {
    let (ticket, mine) = {
        let mut state = shared.lock();
        if state.queue.is_empty()
            && let Some(permit) = state.limit.try_acquire(now(), tokens)
        {
            return Ok(PermitGuard::new(shared.clone(), permit));
        }
        if state.queue.len() >= shared.settings.queue_capacity {
            return Err(Overloaded {
                reason: OverloadReason::QueueFull,
            });
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let mine = Arc::new(Notify::new());
        state.queue.push_back((ticket, mine.clone()));
        (ticket, mine)
    };
    let mut place = QueuePlace {
        shared: shared.clone(),
        ticket,
        left: false,
    };
    let mut expired = pin!(tokio::time::sleep_until(limit_at.into()));
    loop {
        {
            let mut state = shared.lock();
            if state.queue.front().is_some_and(|(t, _)| *t == ticket)
                && let Some(permit) = state.limit.try_acquire(now(), tokens)
            {
                state.queue.pop_front();
                place.left = true;
                // There is room for the next in line too: it looks now, not at the next return.
                let more = state.limit.available(now()) > 0;
                let next = more.then(|| state.front()).flatten();
                drop(state);
                wake(next);
                return Ok(PermitGuard::new(shared.clone(), permit));
            }
        }
        // A wake sent since the look above is kept by `notify_one`: this returns at once then.
        let mut woken = pin!(mine.notified());
        let woke = poll_fn(|cx| {
            if woken.as_mut().poll(cx).is_ready() {
                return Poll::Ready(true);
            }
            expired.as_mut().poll(cx).map(|()| false)
        })
        .await;
        if !woke {
            return Err(Overloaded {
                reason: reason_at_limit,
            });
        }
        #[cfg(test)]
        shared
            .wakeups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Waits until the pacer lets the attempt go, until `limit_at`.
async fn pace(
    shared: &Shared,
    tokens: u64,
    limit_at: Instant,
    reason_at_limit: OverloadReason,
) -> Result<(), Overloaded> {
    loop {
        let at = now();
        let wait = match shared.lock().pacer.check(at, tokens) {
            Ok(()) => return Ok(()),
            Err(wait) => wait,
        };
        if at + wait > limit_at {
            return Err(Overloaded {
                reason: reason_at_limit,
            });
        }
        tokio::time::sleep_until((at + wait).into()).await;
    }
}

/// A call's place in the wait queue; leaving it (dropped future, timeout) lets the next one in.
struct QueuePlace {
    shared: Arc<Shared>,
    ticket: u64,
    left: bool,
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        if self.left {
            return;
        }
        let mut state = self.shared.lock();
        let was_front = state.queue.front().is_some_and(|(t, _)| *t == self.ticket);
        state.queue.retain(|(t, _)| *t != self.ticket);
        // The first in line leaving may have been woken for a permit it will not take: the next
        // one looks instead.
        let next = was_front.then(|| state.front()).flatten();
        drop(state);
        wake(next);
    }
}

/// A permit held by a call: given back with an outcome, or as cancelled when dropped without one.
pub(crate) struct PermitGuard {
    shared: Arc<Shared>,
    permit: Option<Permit>,
}

impl fmt::Debug for PermitGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PermitGuard")
            .field("permit", &self.permit)
            .finish_non_exhaustive()
    }
}

impl PermitGuard {
    fn new(shared: Arc<Shared>, permit: Permit) -> Self {
        Self {
            shared,
            permit: Some(permit),
        }
    }

    /// Moves the permit's send time to `now` (the pacing wait is not part of the round trip).
    fn restamp(&mut self, now: Instant) {
        if let Some(permit) = self.permit.take() {
            self.permit = Some(permit.sent(now));
        }
    }

    /// When the attempt was sent (`or_else` if the permit is already gone).
    fn sent_at(&self, or_else: Instant) -> Instant {
        self.permit.as_ref().map_or(or_else, Permit::sent_at)
    }

    /// Gives the permit back with the attempt's outcome.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        if let Some(permit) = self.permit.take() {
            let (adjustment, front) = {
                let mut state = self.shared.lock();
                let adjustment = state.limit.on_outcome(permit, outcome, now());
                (adjustment, state.front())
            };
            tracing::trace!(
                ?adjustment,
                outcome = outcome.as_str(),
                "tower_aoai: limiter"
            );
            wake(front);
        }
    }
}

impl Drop for PermitGuard {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let front = {
                let mut state = self.shared.lock();
                state.limit.on_cancel(permit, now());
                state.front()
            };
            wake(front);
        }
    }
}
