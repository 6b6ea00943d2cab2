use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::Body;
use tower::{BoxError, ServiceExt};
use tower_service::Service;

use super::RouteBody;
use super::layer::Shared;
use crate::driver::{now, rewrite_request, transport_error};
use crate::future::ResponseFuture;
use crate::policy::classify::{self, Outcome, TransportError};
use crate::policy::route::{BackendId, BlockedError, Pick, RouteStats, Step, SupportRecord};
use crate::policy::stats::Attempt;
use crate::retry::Deadline;
use crate::retry::body::Classified;

/// Routes each call to one of several backends, fails over and hedges. See the
/// [module docs](crate::route).
pub struct Route<S> {
    services: Arc<Vec<S>>,
    shared: Arc<Shared>,
}

impl<S> Clone for Route<S> {
    fn clone(&self) -> Self {
        Self {
            services: self.services.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S> fmt::Debug for Route<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("backends", &self.services.len())
            .finish_non_exhaustive()
    }
}

impl<S> Route<S> {
    pub(super) fn from_shared(services: Vec<S>, shared: Arc<Shared>) -> Self {
        Self {
            services: Arc::new(services),
            shared,
        }
    }

    /// The inner services, one per backend.
    pub fn get_ref(&self) -> &[S] {
        &self.services
    }

    /// The counters of the shared router.
    pub fn stats(&self) -> RouteStats {
        self.shared.lock().router.stats()
    }
}

/// Nothing could be sent: no backend is usable within the call's deadline, and no attempt was
/// made whose response could be returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoBackendError {
    /// How long until the first backend is usable again, if known.
    pub retry_after: Option<std::time::Duration>,
}

impl fmt::Display for NoBackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after {
            Some(d) => write!(
                f,
                "no backend is usable within the call's deadline (first back in {d:?})"
            ),
            None => f.write_str("no backend is usable within the call's deadline"),
        }
    }
}

impl std::error::Error for NoBackendError {}

impl<S, B, ResBody> Service<Request<B>> for Route<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + From<Bytes> + Clone + Unpin + Send + 'static,
    B::Data: Buf,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<RouteBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<Self::Response>;

    /// Always ready: readiness is awaited on the chosen backend's service inside the call.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        ResponseFuture::new(run(self.services.clone(), self.shared.clone(), parts, body))
    }
}

type Res<ResBody> = Result<Response<RouteBody<ResBody>>, BoxError>;

/// One attempt's end: its outcome, what the router says follows, and the response or error.
struct Finished<ResBody> {
    outcome: Outcome,
    step: Step,
    result: Res<ResBody>,
}

/// Counts an attempt as cancelled in the router unless it finished with an outcome.
struct InFlight {
    shared: Arc<Shared>,
    id: BackendId,
    done: bool,
}

impl InFlight {
    /// The attempt ended with an outcome (reported by the caller, not as a cancellation).
    fn finished(&mut self) {
        self.done = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.shared.lock().router.on_cancel(self.id);
        }
    }
}

// Not an `async fn`: see the note in `crate::future`.
#[allow(clippy::manual_async_fn)]
fn run<S, B, ResBody>(
    services: Arc<Vec<S>>,
    shared: Arc<Shared>,
    parts: http::request::Parts,
    body: B,
) -> impl Future<Output = Res<ResBody>>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + From<Bytes> + Clone + Unpin + Send + 'static,
    B::Data: Buf,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let deadline = parts.extensions.get::<Deadline>().map(|d| d.0);
        let mut call = shared.lock().router.start(now(), deadline);
        let mut last: Option<Finished<ResBody>> = None;
        loop {
            let pick = {
                let mut core = shared.lock();
                let core = &mut *core;
                core.router
                    .pick(&call, now(), &*shared.headroom, &mut core.rng)
            };
            let primary = match pick {
                Pick::Send(id) => id,
                Pick::Wait(at) => {
                    tracing::debug!(
                        wait_ms = at.saturating_duration_since(now()).as_millis() as u64,
                        "tower_aoai: no usable backend; waiting for the first to come back"
                    );
                    Box::pin(tokio::time::sleep_until(at.into())).await;
                    continue;
                }
                Pick::GiveUp(no) => {
                    let last_blocked = last.as_ref().is_none_or(|l| l.outcome == Outcome::Blocked);
                    if let Some(record) = no.blocked
                        && last_blocked
                    {
                        return Err(BlockedError::new(record).into());
                    }
                    return match last {
                        Some(l) => l.result,
                        None => Err(NoBackendError {
                            retry_after: no.next_usable.map(|t| t.saturating_duration_since(now())),
                        }
                        .into()),
                    };
                }
            };
            let first = send(&services, &shared, &mut call, primary, &parts, &body)?;
            let hedge_after = shared.lock().router.hedge_delay(&call, primary, now());
            let f = match hedge_after {
                None => first.await,
                Some(after) => {
                    // Boxed: only a call that may hedge needs the race's state.
                    Box::pin(race_with_hedge(
                        first,
                        after,
                        &services,
                        &shared,
                        &mut call,
                        primary,
                        &parts,
                        body.clone(),
                    ))
                    .await
                }
            };
            if f.step == Step::Return {
                return f.result;
            }
            tracing::debug!(
                backend = primary.index(),
                outcome = f.outcome.as_str(),
                "tower_aoai: failing over"
            );
            last = Some(f);
        }
    }
}

type AttemptFuture<ResBody> = Pin<Box<dyn Future<Output = Finished<ResBody>> + Send>>;

/// Rewrites the request for `id`, counts the attempt and returns its future.
fn send<S, B, ResBody>(
    services: &Arc<Vec<S>>,
    shared: &Arc<Shared>,
    call: &mut crate::policy::route::RouteCall,
    id: BackendId,
    parts: &http::request::Parts,
    body: &B,
) -> Result<AttemptFuture<ResBody>, BoxError>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + From<Bytes> + Clone + Unpin + Send + 'static,
    B::Data: Buf,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<BoxError>,
{
    let req = rewrite_request(shared.lock().router.backends(), id, parts, body)?;
    let sent_at = now();
    {
        let mut core = shared.lock();
        core.router.on_send(call, id, sent_at);
    }
    let guard = InFlight {
        shared: shared.clone(),
        id,
        done: false,
    };
    let svc = services[id.index()].clone();
    let deadline = call.deadline();
    Ok(Box::pin(attempt(svc, req, guard, sent_at, deadline)))
}

// Not an `async fn`: see the note in `crate::future`.
#[allow(clippy::manual_async_fn)]
fn attempt<S, B, ResBody>(
    svc: S,
    req: Request<B>,
    mut guard: InFlight,
    sent_at: Instant,
    deadline: Option<Instant>,
) -> impl Future<Output = Finished<ResBody>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Unpin,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let id = guard.id;
        let result = match svc.oneshot(req).await {
            Ok(res) => Ok(res),
            Err(e) => Err(e.into()),
        };
        let latency = now().saturating_duration_since(sent_at);
        let (class, result, record) = match result {
            Err(e) if e.is::<crate::limit::Overloaded>() => {
                // The backend's own limiter refused to send (its queue is full or the wait would
                // pass the deadline): nothing reached the backend, so its breaker learns nothing (the
                // guard reports the attempt cancelled) and the call moves on to another backend.
                drop(guard);
                return Finished {
                    outcome: classify::classify_error(TransportError::Connect).outcome,
                    step: Step::FailOver,
                    result: Err(e),
                };
            }
            Ok(res) => {
                // An error's body is read in a boxed future: an error is the exception, and its
                // read should not grow every call's future.
                let classified = if classify::needs_body(res.status()) {
                    let remaining = deadline.map(|d| d.saturating_duration_since(now()));
                    Box::pin(Classified::read(res, remaining)).await
                } else {
                    Ok(Classified::unread(res))
                };
                match classified {
                    Ok(c) => {
                        let record = (c.class.outcome == Outcome::Blocked).then(|| {
                            let core = guard.shared.lock();
                            let backends = core.router.backends();
                            let b = backends.get(id);
                            SupportRecord::new(
                                b.name(),
                                backends.resource_host(backends.resource(id)),
                                b.deployment(),
                                b.region(),
                                c.response.status(),
                                c.response.headers(),
                                &c.prefix,
                                c.wall,
                            )
                        });
                        // Only a success's body is watched: an error was counted on its
                        // headers, and how its body ends says nothing more of the backend.
                        let response = if c.class.outcome == Outcome::Success {
                            let shared = guard.shared.clone();
                            c.response.map(|body| RouteBody::watched(body, shared, id))
                        } else {
                            c.response.map(RouteBody::unwatched)
                        };
                        (c.class, Ok(response), record)
                    }
                    Err(e) => (
                        classify::classify_error(TransportError::Connect),
                        Err(e),
                        None,
                    ),
                }
            }
            Err(e) => (classify::classify_error(transport_error(&*e)), Err(e), None),
        };
        guard.finished();
        let step = {
            let mut core = guard.shared.lock();
            let core = &mut *core;
            if let Some(stats) = &core.stats {
                let backend = core.router.backends().get(id);
                stats.record(Attempt {
                    backend: backend.name(),
                    region: backend.region(),
                    class: &class,
                    headers: result.as_ref().ok().map(|r| r.headers()),
                    latency: Some(latency),
                    retry: false,
                    hedge: false,
                    wall_now: SystemTime::now(),
                });
                if let Some(record) = &record {
                    stats.with(|s| s.record_block(record.clone()));
                }
            }
            match record {
                Some(record) => {
                    tracing::warn!(
                        backend = core.router.backends().get(id).name(),
                        "tower_aoai: resource blocked (403); no traffic goes there for a while:\n{record}"
                    );
                    core.router.on_blocked(id, record, now())
                }
                None => core
                    .router
                    .on_response(id, &class, latency, now(), &mut core.rng),
            }
        };
        Finished {
            outcome: class.outcome,
            step,
            result,
        }
    }
}

/// Runs the attempt to `primary`; after `after` without an answer, sends a hedge to another
/// usable backend (if the budget allows) and returns the first answer that ends the call, dropping
/// the other attempt. When both fail, the later failure comes back for failover.
#[allow(clippy::too_many_arguments)]
// Not an `async fn`: see the note in `crate::future`.
#[allow(clippy::manual_async_fn)]
fn race_with_hedge<S, B, ResBody>(
    mut first: AttemptFuture<ResBody>,
    after: std::time::Duration,
    services: &Arc<Vec<S>>,
    shared: &Arc<Shared>,
    call: &mut crate::policy::route::RouteCall,
    primary: BackendId,
    parts: &http::request::Parts,
    body: B,
) -> impl Future<Output = Finished<ResBody>>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + From<Bytes> + Clone + Unpin + Send + 'static,
    B::Data: Buf,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let mut timer = std::pin::pin!(tokio::time::sleep(after));
        let early = poll_fn(|cx| {
            if let Poll::Ready(f) = first.as_mut().poll(cx) {
                return Poll::Ready(Some(f));
            }
            timer.as_mut().poll(cx).map(|()| None)
        })
        .await;
        if let Some(f) = early {
            return f;
        }
        let hedge_to = {
            let mut core = shared.lock();
            let core = &mut *core;
            core.router
                .pick_hedge(call, primary, now(), &*shared.headroom, &mut core.rng)
        };
        let Some(hedge_to) = hedge_to else {
            return first.await;
        };
        tracing::debug!(
            primary = primary.index(),
            hedge = hedge_to.index(),
            after_ms = after.as_millis() as u64,
            "tower_aoai: hedging a slow attempt"
        );
        let second = match send(services, shared, call, hedge_to, parts, &body) {
            Ok(f) => f,
            Err(_) => return first.await,
        };
        let mut attempts = [Some(first), Some(second)];
        loop {
            let done = poll_fn(|cx| {
                for slot in attempts.iter_mut() {
                    if let Some(fut) = slot
                        && let Poll::Ready(f) = fut.as_mut().poll(cx)
                    {
                        *slot = None;
                        return Poll::Ready(f);
                    }
                }
                Poll::Pending
            })
            .await;
            // The first answer that ends the call wins, and the other attempt is dropped with
            // `attempts` (its connection closed, its permit released, the router told it was
            // cancelled). A failure waits for the other attempt; when both failed, the later one
            // goes back for failover.
            if done.step == Step::Return || attempts.iter().all(Option::is_none) {
                return done;
            }
        }
    }
}
