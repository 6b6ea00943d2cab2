use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use tower::{BoxError, ServiceExt};
use tower_service::Service;

use super::body::{Classified, RetryBody};
use super::layer::Shared;
use crate::driver::{now, take_ready, transport_error};
use crate::future::ResponseFuture;
use crate::policy::classify::{self, TransportError};
use crate::policy::engine::PASSTHROUGH_BACKEND;
use crate::policy::stats::Attempt;
use crate::policy::{Action, RetryPolicy};

/// The caller's own deadline for a call, as a request extension; the retry loop never waits past
/// it (nor past the policy's deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// Retries calls by a [`RetryPolicy`]. See the [module docs](crate::retry).
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Retry<S> {
    /// Wraps `inner` with retries by `policy`.
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        super::RetryLayer::new(policy).layer_service(inner)
    }

    pub(super) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
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

impl super::RetryLayer {
    fn layer_service<S>(&self, inner: S) -> Retry<S> {
        tower_layer::Layer::layer(self, inner)
    }
}

impl<S, B, ResBody> Service<Request<B>> for Retry<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Clone + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<RetryBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let ready = take_ready(&mut self.inner);
        let span = tracing::debug_span!(
            "tower_aoai.call",
            method = %req.method(),
            path = req.uri().path()
        );
        ResponseFuture::new(tracing::Instrument::instrument(
            run(ready, self.shared.clone(), req),
            span,
        ))
    }
}

// Not an `async fn`: see the note in `crate::future`.
#[allow(clippy::manual_async_fn)]
fn run<S, B, ResBody>(
    mut svc: S,
    shared: Arc<Shared>,
    req: Request<B>,
) -> impl Future<Output = Result<Response<RetryBody<ResBody>>, BoxError>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    B: Clone,
    ResBody: Body<Data = Bytes> + Unpin,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let policy = &shared.policy;
        let caller_deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        let mut call = {
            let mut budget = shared.budget.lock().unwrap_or_else(|e| e.into_inner());
            policy.start(now(), caller_deadline, &mut budget)
        };
        let mut first = true;
        loop {
            if !first {
                svc.ready().await.map_err(Into::into)?;
            }
            let sent_at = now();
            let retry = !first;
            first = false;
            let attempt = svc.call(req.clone()).await.map_err(Into::into);
            let latency = now().saturating_duration_since(sent_at);
            let (class, result) = match attempt {
                Ok(res) => {
                    // An error's body is read in a boxed future: an error is the exception, and
                    // its read should not grow every call's future.
                    let classified = if classify::needs_body(res.status()) {
                        Box::pin(Classified::read(res, call.remaining(now()))).await
                    } else {
                        Ok(Classified::unread(res))
                    };
                    match classified {
                        Ok(c) => (c.class, Ok(c.response)),
                        Err(e) => (classify::classify_error(TransportError::Connect), Err(e)),
                    }
                }
                // A 403 block is final: the router sends nothing more to a blocked resource. So is
                // the limiter's refusal: its queue was full or its wait would pass the deadline, and
                // backing off here would only queue the call again.
                Err(e)
                    if e.is::<crate::policy::route::BlockedError>()
                        || e.is::<crate::limit::Overloaded>() =>
                {
                    return Err(e);
                }
                Err(e) => (classify::classify_error(transport_error(&*e)), Err(e)),
            };
            if let Some(stats) = &shared.stats {
                stats.record(Attempt {
                    backend: PASSTHROUGH_BACKEND,
                    region: None,
                    class: &class,
                    headers: result.as_ref().ok().map(|r| r.headers()),
                    latency: Some(latency),
                    retry,
                    hedge: false,
                    wall_now: SystemTime::now(),
                });
            }
            let action = {
                let mut budget = shared.budget.lock().unwrap_or_else(|e| e.into_inner());
                let mut rng = shared.rng.lock().unwrap_or_else(|e| e.into_inner());
                policy.on_attempt(&mut call, &class, now(), &mut budget, &mut rng)
            };
            match action {
                Action::Retry { after, hint } => {
                    tracing::debug!(
                        attempt = call.attempts(),
                        outcome = class.outcome.as_str(),
                        wait_ms = after.as_millis() as u64,
                        hint = hint.map(|h| h.as_str()),
                        "tower_aoai: retrying"
                    );
                    // The failed response (and its connection) is released before the wait.
                    drop(result);
                    Box::pin(tokio::time::sleep(after)).await;
                }
                Action::GiveUp(reason) => {
                    tracing::info!(
                        attempts = call.attempts(),
                        outcome = class.outcome.as_str(),
                        reason = reason.as_str(),
                        "tower_aoai: giving up"
                    );
                    return result.map(|mut res| {
                        res.headers_mut()
                            .insert("x-should-retry", HeaderValue::from_static("false"));
                        res
                    });
                }
                _ => return result,
            }
        }
    }
}
