//! One call through a [`Stack`](super::Stack): the [`Engine`]'s decisions carried out over the
//! client, in one future.
//!
//! The engine decides everything (attempts, backoff, the backend, failover, hedging, the limit and
//! pacing of each backend, the stats); this driver sends, waits and reads. Per attempt it takes
//! the engine's lock twice (the decision with the rewrite; the response), copies the request once
//! (the rewrite for the chosen backend) and classifies the response once.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes};
use http::{HeaderValue, Request, Response};
use http_body::Body;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tower::{BoxError, ServiceExt};
use tower_service::Service;

use crate::driver::{estimate_tokens, now, rewrite_request, transport_error};
use crate::limit::{LimitBody, OverloadReason, Overloaded};
use crate::policy::TokenEstimator;
use crate::policy::classify::{self, Outcome};
use crate::policy::engine::{After, BodyEnd, Engine, EngineCall, Failure, Lease, Next, Ticket};
use crate::policy::headers::SHOULD_RETRY;
use crate::policy::route::BackendId;
use crate::policy::route::BlockedError;
use crate::retry::body::read_error_body;
use crate::retry::{Deadline, RetryBody};
use crate::route::NoBackendError;

/// The response of a [`Stack`](super::Stack): the client's, its error body's start replayed if
/// it was read, holding a success's permit until its body ends.
pub type StackResponse<B> = Response<LimitBody<RetryBody<B>>>;

/// The call's deadline (the caller's [`Deadline`], or the retry policy's) passed before an attempt
/// could be sent: every backend was cooling down, pacing or full until then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineExceeded {
    /// Attempts the call made before its deadline.
    pub attempts: u32,
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the call's deadline passed before an attempt could be sent ({} attempts made)",
            self.attempts
        )
    }
}

impl std::error::Error for DeadlineExceeded {}

/// What every call of a stack (and every clone of it) shares.
pub(crate) struct Shared {
    engine: Mutex<Engine>,
    /// The queued calls, in the order they queued: a permit that goes back wakes the first
    /// (`notify_one`; a call woken but dropped before it looked passes the wake on).
    ended: Notify,
    /// The engine's estimator, used before its lock is taken.
    estimator: TokenEstimator,
    /// Times a returned permit woke a queued call (what the tests count).
    #[cfg(test)]
    pub(super) wakeups: std::sync::atomic::AtomicUsize,
}

impl Shared {
    pub(super) fn new(engine: Engine) -> Self {
        Self {
            estimator: *engine.token_estimator(),
            engine: Mutex::new(engine),
            ended: Notify::new(),
            #[cfg(test)]
            wakeups: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the first queued call after a permit went back, if any was queued when it did
    /// (`queued`, read under the same lock). A call joins the queue and registers to be woken
    /// under that lock, so a permit that came back to an empty queue misses nobody. One call, not
    /// all: with thousands queued, waking all on every return costs each of them a turn of the
    /// lock per permit. The woken call passes the wake on when the engine says so
    /// ([`Engine::passes_wake_on`], in `run`); the engine's recheck (at most a second) covers any
    /// room that appears without a permit coming back.
    fn wake(&self, queued: bool) {
        if queued {
            self.ended.notify_one();
        }
    }

    /// Gives back the permit of an attempt that ended without an outcome.
    fn cancel(&self, ticket: Ticket) {
        let queued = {
            let mut engine = self.lock();
            engine.on_cancel(ticket, now());
            engine.has_queued()
        };
        self.wake(queued);
    }
}

/// The lease of a success whose body is still being read: the body's end (or drop) gives the
/// permit back to the engine, as the limit layer's body does with its permit.
pub(crate) struct LeaseGuard {
    shared: Arc<Shared>,
    lease: Option<Lease>,
}

impl LeaseGuard {
    /// The body ended: read to its end (a success), or broken off.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        let end = if outcome == Outcome::Success {
            BodyEnd::Finished
        } else {
            BodyEnd::Failed
        };
        self.end(end);
    }

    fn end(&mut self, end: BodyEnd) {
        if let Some(lease) = self.lease.take() {
            let queued = {
                let mut engine = self.shared.lock();
                engine.end_body(lease, end, now());
                engine.has_queued()
            };
            self.shared.wake(queued);
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.end(BodyEnd::Dropped);
    }
}

impl fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// A call's state in the engine: a call dropped while it queues leaves the queue.
struct CallGuard<'a> {
    shared: &'a Shared,
    call: EngineCall,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if self.call.is_queued() {
            self.shared.lock().forget(&mut self.call);
        }
    }
}

/// An attempt in flight: dropped before its answer was fed to the engine (the call cancelled,
/// a hedge lost), its permit goes back and the router counts it cancelled.
struct Sending<'a> {
    shared: &'a Shared,
    ticket: Option<Ticket>,
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.shared.cancel(ticket);
        }
    }
}

/// An attempt's answer, before the engine has seen it.
struct Answer<B> {
    response: Response<RetryBody<B>>,
    /// The start of an error body, read to classify it (replayed by the body).
    prefix: Option<Bytes>,
}

/// An attempt's answer, with the engine's word on what follows.
struct Sent<B> {
    after: After,
    result: Result<StackResponse<B>, BoxError>,
}

/// What the engine asked of a call that sends nothing now.
enum Pause<'a> {
    Wait(Duration),
    Queue(Duration, Pin<Box<Notified<'a>>>),
    Fail(Failure),
}

/// Runs one call. `svc` is ready for the first attempt.
// Not an `async fn`: see the note in `crate::future`.
#[allow(clippy::manual_async_fn)]
pub(super) fn run<S, B, ResBody>(
    mut svc: S,
    shared: Arc<Shared>,
    parts: http::request::Parts,
    body: B,
) -> impl Future<Output = Result<StackResponse<ResBody>, BoxError>>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes> + Clone,
    B::Data: Buf,
    ResBody: Body<Data = Bytes> + Unpin,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let deadline = parts.extensions.get::<Deadline>().map(|d| d.0);
        let tokens = estimate_tokens(&shared.estimator, &parts.extensions, &body);
        let started = shared.lock().start_estimated(now(), tokens, deadline);
        let mut call = CallGuard {
            shared: &shared,
            call: started,
        };
        // The client is ready for the first attempt; it is made ready again after each call.
        let mut ready = true;
        // Whether a returned permit just woke this call from the queue.
        let mut woken = false;
        loop {
            if !ready {
                svc.ready().await.map_err(Into::into)?;
                ready = true;
            }
            // Each step below is its own block: rustc keeps a local's room in the call's future
            // until its scope ends, even after it was moved, and the future should stay small
            // (under glibc's small-allocation cache) for the common call that sends at once.
            let decided = {
                // Decided under one lock: the attempt and its rewritten request, or a pause.
                let (chosen, pass_on) = {
                    let mut engine = shared.lock();
                    let at = now();
                    let next = engine.next(&mut call.call, at);
                    let pass_on = std::mem::take(&mut woken) && engine.passes_wake_on(&next, at);
                    let chosen = match next {
                        Next::Send(ticket) => {
                            let id = ticket.backend();
                            match rewrite_request(engine.backends(), id, &parts, &body) {
                                Ok(req) => {
                                    let hedge = engine.hedge_delay(&call.call, id, at);
                                    Ok((ticket, req, hedge))
                                }
                                Err(e) => {
                                    engine.on_cancel(ticket, at);
                                    let queued = engine.has_queued();
                                    drop(engine);
                                    shared.wake(queued);
                                    return Err(e.into());
                                }
                            }
                        }
                        Next::Wait(d) => Err(Pause::Wait(d)),
                        Next::Queue(d) => {
                            // Registered under the lock the call queued under: a permit that
                            // comes back after this wakes it.
                            let mut ended = Box::pin(shared.ended.notified());
                            ended.as_mut().enable();
                            Err(Pause::Queue(d, ended))
                        }
                        Next::Fail(failure) => Err(Pause::Fail(failure)),
                    };
                    (chosen, pass_on)
                };
                if pass_on {
                    shared.ended.notify_one();
                }
                chosen.map(|(ticket, req, hedge)| {
                    let backend = ticket.backend();
                    let attempt = Sending {
                        shared: &shared,
                        ticket: Some(ticket),
                    };
                    ready = false;
                    (attempt, backend, hedge, svc.call(req))
                })
            };
            let (attempt, backend, hedge, sending) = match decided {
                Ok(send) => send,
                Err(pause) => {
                    woken = pause_for(pause, call.call.attempts()).await?;
                    #[cfg(test)]
                    if woken {
                        shared
                            .wakeups
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    continue;
                }
            };
            let limit = call.call.deadline();
            let sent = match hedge {
                None => {
                    let answer = exchange(sending, limit).await;
                    feed(&shared, &mut call.call, attempt, answer)
                }
                // Boxed: only a call that may hedge needs the race's state.
                Some(after) => {
                    let hedge = Hedge {
                        svc: svc.clone(),
                        primary: backend,
                        after,
                        parts: &parts,
                        body: body.clone(),
                        deadline: limit,
                    };
                    Box::pin(race(&shared, &mut call.call, attempt, sending, hedge)).await
                }
            };
            match sent.after {
                After::Retry => {
                    tracing::debug!(
                        backend = backend.index(),
                        attempts = call.call.attempts(),
                        outcome = call.call.last_outcome().map(Outcome::as_str),
                        "tower_aoai: trying again"
                    );
                }
                After::GiveUp(reason) => {
                    tracing::info!(
                        attempts = call.call.attempts(),
                        outcome = call.call.last_outcome().map(Outcome::as_str),
                        reason = reason.as_str(),
                        "tower_aoai: giving up"
                    );
                    return sent.result.map(|mut res| {
                        res.headers_mut()
                            .insert(SHOULD_RETRY, HeaderValue::from_static("false"));
                        res
                    });
                }
                _ => return sent.result,
            }
        }
    }
}

/// Waits out a pause the engine asked for (boxed: a wait is the exception), or fails the call.
/// `Ok(true)` when a returned permit woke the call from the queue.
async fn pause_for(pause: Pause<'_>, attempts: u32) -> Result<bool, BoxError> {
    match pause {
        Pause::Wait(d) => {
            tracing::debug!(
                wait_ms = d.as_millis() as u64,
                "tower_aoai: waiting for a backend"
            );
            Box::pin(tokio::time::sleep(d)).await;
            Ok(false)
        }
        Pause::Queue(d, ended) => {
            tracing::debug!(
                wait_ms = d.as_millis() as u64,
                "tower_aoai: queueing for a permit"
            );
            // Woken by a permit coming back, or after `d` to ask again.
            Ok(Box::pin(tokio::time::timeout(d, ended)).await.is_ok())
        }
        Pause::Fail(failure) => {
            tracing::info!(attempts, "tower_aoai: {failure}");
            Err(failure_error(failure, attempts))
        }
    }
}

/// The typed error of a call the engine could not serve.
fn failure_error(failure: Failure, attempts: u32) -> BoxError {
    match failure {
        Failure::Blocked(record) => BlockedError::new(record).into(),
        Failure::Overloaded => Overloaded {
            reason: OverloadReason::QueueTimeout,
        }
        .into(),
        Failure::NoBackend => NoBackendError { retry_after: None }.into(),
        Failure::DeadlineExceeded => DeadlineExceeded { attempts }.into(),
    }
}

/// Sends one attempt and reads what classifying its answer needs: the status and headers, and
/// the start of an error body (bounded in size and time, never past `deadline`).
// Not an `async fn`: see the note in `crate::future`.
#[allow(clippy::manual_async_fn)]
fn exchange<F, E, B>(
    sent: F,
    deadline: Option<Instant>,
) -> impl Future<Output = Result<Answer<B>, BoxError>>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    async move {
        let response = sent.await.map_err(Into::into)?;
        if !classify::needs_body(response.status()) {
            return Ok(Answer {
                response: response.map(RetryBody::passthrough),
                prefix: None,
            });
        }
        Box::pin(read_answer(response, deadline)).await
    }
}

/// Reads the start of an error response's body (bounded in size and time, never past
/// `deadline`), to classify it, and replays it before the rest.
async fn read_answer<B>(
    response: Response<B>,
    deadline: Option<Instant>,
) -> Result<Answer<B>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let remaining = deadline.map(|d| d.saturating_duration_since(now()));
    let (parts, body) = response.into_parts();
    let (prefix, body) = read_error_body(body, remaining).await?;
    Ok(Answer {
        response: Response::from_parts(parts, body),
        prefix: Some(prefix),
    })
}

/// Hands an attempt's answer (or transport error) to the engine, which classifies it, learns
/// from it and says what follows.
fn feed<B>(
    shared: &Arc<Shared>,
    call: &mut EngineCall,
    mut attempt: Sending<'_>,
    answer: Result<Answer<B>, BoxError>,
) -> Sent<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let ticket = attempt
        .ticket
        .take()
        .expect("an attempt's answer is fed once, by the attempt's owner");
    let backend = ticket.backend();
    let (at, wall) = (now(), SystemTime::now());
    match answer {
        Ok(Answer { response, prefix }) => {
            let (after, lease, queued, blocked) = {
                let mut engine = shared.lock();
                let (after, lease) = engine.on_response_streamed(
                    call,
                    ticket,
                    response.status(),
                    response.headers(),
                    prefix.as_deref(),
                    at,
                    wall,
                );
                let blocked = (call.last_outcome() == Some(Outcome::Blocked))
                    .then(|| engine.block_record(backend))
                    .flatten();
                (after, lease, engine.has_queued(), blocked)
            };
            // Only a success keeps its permit (in the lease, until its body ends).
            let response = match lease {
                Some(lease) => response.map(|body| {
                    LimitBody::leased(
                        body,
                        LeaseGuard {
                            shared: shared.clone(),
                            lease: Some(lease),
                        },
                    )
                }),
                None => {
                    shared.wake(queued);
                    response.map(LimitBody::free)
                }
            };
            if let Some(record) = blocked {
                tracing::warn!(
                    backend = backend.index(),
                    "tower_aoai: resource blocked (403); no traffic goes there for a while:\n{record}"
                );
                // No other resource could serve: the block is the call's answer, as an error
                // that carries the record for a support request.
                if after != After::Retry {
                    return Sent {
                        after: After::Return,
                        result: Err(BlockedError::new(record).into()),
                    };
                }
            }
            Sent {
                after,
                result: Ok(response),
            }
        }
        Err(error) => {
            let kind = transport_error(&*error);
            let (after, queued) = {
                let mut engine = shared.lock();
                let after = engine.on_error(call, ticket, kind, at, wall);
                (after, engine.has_queued())
            };
            shared.wake(queued);
            Sent {
                after,
                result: Err(error),
            }
        }
    }
}

/// What a hedge of a slow attempt needs.
struct Hedge<'a, S, B> {
    svc: S,
    primary: BackendId,
    after: Duration,
    parts: &'a http::request::Parts,
    body: B,
    deadline: Option<Instant>,
}

/// Runs the attempt `primary` (`first`); after `hedge.after` without an answer, sends a hedge to
/// another backend if the engine allows one, and returns the first answer that ends the call.
/// A failure waits for the other attempt; when both fail, the later one's decision stands. The
/// loser is dropped (its connection closed, its permit back, the router told it was cancelled).
// Not an `async fn`: see the note in `crate::future`.
#[allow(clippy::manual_async_fn)]
fn race<'a, S, B, ResBody>(
    shared: &'a Arc<Shared>,
    call: &'a mut EngineCall,
    primary: Sending<'a>,
    first: S::Future,
    hedge: Hedge<'a, S, B>,
) -> impl Future<Output = Sent<ResBody>> + 'a
where
    S: Service<Request<B>, Response = Response<ResBody>> + 'a,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes> + Clone + 'a,
    B::Data: Buf,
    ResBody: Body<Data = Bytes> + Unpin + 'a,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let Hedge {
            svc,
            primary: primary_id,
            after,
            parts,
            body,
            deadline,
        } = hedge;
        let mut first = pin!(exchange(first, deadline));
        let mut timer = pin!(tokio::time::sleep(after));
        let early = poll_fn(|cx| {
            if let Poll::Ready(answer) = first.as_mut().poll(cx) {
                return Poll::Ready(Some(answer));
            }
            timer.as_mut().poll(cx).map(|()| None)
        })
        .await;
        if let Some(answer) = early {
            return feed(shared, call, primary, answer);
        }
        let second = {
            let mut engine = shared.lock();
            let at = now();
            match engine.hedge(call, primary_id, at) {
                Some(ticket) => {
                    match rewrite_request(engine.backends(), ticket.backend(), parts, &body) {
                        Ok(req) => Some((ticket, req)),
                        Err(_) => {
                            engine.on_cancel(ticket, at);
                            let queued = engine.has_queued();
                            drop(engine);
                            shared.wake(queued);
                            None
                        }
                    }
                }
                None => None,
            }
        };
        let Some((ticket, req)) = second else {
            let answer = first.await;
            return feed(shared, call, primary, answer);
        };
        tracing::debug!(
            primary = primary_id.index(),
            hedge = ticket.backend().index(),
            after_ms = after.as_millis() as u64,
            "tower_aoai: hedging a slow attempt"
        );
        let hedged = Sending {
            shared,
            ticket: Some(ticket),
        };
        let mut second = pin!(async move {
            let mut svc = svc;
            svc.ready().await.map_err(Into::into)?;
            exchange(svc.call(req), deadline).await
        });
        let mut attempts = [Some(primary), Some(hedged)];
        loop {
            let (i, answer) = poll_fn(|cx| {
                if attempts[0].is_some()
                    && let Poll::Ready(answer) = first.as_mut().poll(cx)
                {
                    return Poll::Ready((0, answer));
                }
                if attempts[1].is_some()
                    && let Poll::Ready(answer) = second.as_mut().poll(cx)
                {
                    return Poll::Ready((1, answer));
                }
                Poll::Pending
            })
            .await;
            let Some(attempt) = attempts[i].take() else {
                continue;
            };
            let sent = feed(shared, call, attempt, answer);
            // The first answer that ends the call wins; the other attempt is dropped with
            // `attempts` and its future.
            if sent.after != After::Retry || attempts.iter().all(Option::is_none) {
                return sent;
            }
        }
    }
}
