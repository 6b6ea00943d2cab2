//! The recommended full stack, from one builder: retry → route/hedge → limit and pace per backend
//! → client, as one service.
//!
//! A [`Stack`] is not the layers composed (`RetryLayer` over `RouteLayer` over an
//! `AdaptiveConcurrencyLayer` per backend, which stay the à-la-carte API): it runs each call as
//! one future over one [`Engine`], the sans-IO state machine the Python transports drive, which
//! composes the same retry, router, limiter and pacer cores in the same order. Per attempt: one
//! copy of the request (rewritten for its backend), one classification of the answer, two turns
//! of one lock.
//!
//! - **Retry**: Retry-After-aware, budgeted; a failover to another backend waits for nothing, a
//!   wait happens only when no backend is usable (the first to come back is waited for, within
//!   the deadline) or the only usable one failed without a hint (backoff). On give-up the last
//!   real response comes back marked `x-should-retry: false`. A 403 block is final
//!   ([`BlockedError`](crate::policy::route::BlockedError)) once no other resource can serve.
//! - **Route**: provisioned tier first, cooldowns from the server's hints, a breaker per
//!   resource, blocked resources left alone, slow attempts hedged to another backend within a
//!   budget.
//! - **Limit and pace per backend**: each backend's own 429-driven limit and pacing. A backend at
//!   its limit is passed over for one of the same tier with room, or spills to the next tier;
//!   when every usable backend is full the call queues for a permit (at most the limiter's queue
//!   timeout: then [`Overloaded`](crate::limit::Overloaded)). A success holds its permit until
//!   its body ends, so a stream keeps its slot while it streams.
//! - **Observe**: [`Stack::stats`] and [`Stack::diagnose`], per backend; every attempt is a
//!   `tower_aoai::attempt` tracing event (and, with the `metrics` feature, a counter and a
//!   latency sample), as in [`observe`](crate::observe).
//!
//! The caller's [`Deadline`](crate::retry::Deadline) bounds every wait; a request's
//! [`TokenEstimate`](crate::limit::TokenEstimate) replaces reading its body for the estimate.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{ServiceExt, service_fn};
//! use tower_aoai::policy::route::Backend;
//! use tower_aoai::stack::Stack;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let client = service_fn(|req: Request<Full<Bytes>>| async move {
//!     let status = if req.uri().host() == Some("ptu.example.com") { 429 } else { 200 };
//!     Ok::<_, Infallible>(Response::builder().status(status)
//!         .body(Full::new(Bytes::from_static(b"{}"))).unwrap())
//! });
//! let stack = Stack::builder()
//!     .backend(Backend::new("ptu", "https://ptu.example.com").with_api_key("k1").with_tier(0))
//!     .backend(Backend::new("paygo", "https://paygo.example.com").with_api_key("k2").with_tier(1))
//!     .seed(1)
//!     .build(client)?;
//! let req = Request::post("https://ptu.example.com/openai/deployments/gpt-4o/chat/completions")
//!     .body(Full::new(Bytes::from_static(b"{}")))?;
//! let res = stack.clone().oneshot(req).await?;
//! assert_eq!(res.status(), StatusCode::OK); // spilled over to the standard tier at once
//! assert_eq!(stack.route_stats().attempts, 2);
//! # Ok(()) }
//! ```

mod call;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::Body;
use tower::BoxError;
use tower_service::Service;

use crate::driver::{now, take_ready};
use crate::future::ResponseFuture;
use crate::limit::AdaptiveConcurrencyLayer;
use crate::policy::diagnose::Diagnosis;
use crate::policy::engine::{Engine, EngineConfig};
use crate::policy::route::{Backend, Backends, RoutePolicy, RouteStats};
use crate::policy::stats::Stats;
use crate::policy::{ConfigError, RetryBudget, RetryPolicy};

pub(crate) use call::LeaseGuard;
use call::Shared;
pub use call::{DeadlineExceeded, StackResponse};

/// The full stack over a client `S`, as one service. Build it with [`Stack::builder`]; clones
/// share its state (limits, cooldowns, budget, stats).
pub struct Stack<S> {
    client: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for Stack<S> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S> fmt::Debug for Stack<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let engine = self.shared.lock();
        let names: Vec<&str> = engine
            .backends()
            .ids()
            .map(|id| engine.backends().get(id).name())
            .collect();
        f.debug_struct("Stack")
            .field("backends", &names)
            .finish_non_exhaustive()
    }
}

impl Stack<()> {
    /// A builder with the default policies and no backends yet.
    pub fn builder() -> StackBuilder {
        StackBuilder::default()
    }
}

impl<S> Stack<S> {
    /// Counters and gauges per backend, as of now: every attempt's outcome (429s by cause, 403s,
    /// 5xx, connection errors), headroom from the rate-limit headers, latency, and the limiter's
    /// and router's state (limit, in flight, queue, cooldown and breaker deadlines).
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats(now(), SystemTime::now()).clone()
    }

    /// Why throttling happened, from the stats: quota, capacity, provisioned or region, with the
    /// figures, and the support record of every 403 block.
    pub fn diagnose(&self) -> Diagnosis {
        self.shared.lock().diagnose(now(), SystemTime::now())
    }

    /// The router's counters (calls, attempts, hedges, cancellations, waits).
    pub fn route_stats(&self) -> RouteStats {
        self.shared.lock().route_stats()
    }

    /// The client.
    pub fn get_ref(&self) -> &S {
        &self.client
    }

    /// Consumes `self`, returning the client.
    pub fn into_inner(self) -> S {
        self.client
    }
}

impl<S, B, ResBody> Service<Request<B>> for Stack<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + From<Bytes> + Clone + Send + 'static,
    B::Data: Buf,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = StackResponse<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.client.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let ready = take_ready(&mut self.client);
        // The request is taken apart here, not in the call's future: what a future's arguments
        // held keeps its room in the future (see `crate::future`).
        let (parts, body) = req.into_parts();
        ResponseFuture::new(call::run(ready, self.shared.clone(), parts, body))
    }
}

/// Configures a [`Stack`]. Every setting has a default except the backends.
#[derive(Debug, Clone, Default)]
pub struct StackBuilder {
    backends: Vec<Backend>,
    retry: RetryPolicy,
    retry_budget: Option<RetryBudget>,
    route: RoutePolicy,
    limit: Option<AdaptiveConcurrencyLayer>,
    seed: Option<u64>,
}

impl StackBuilder {
    /// Adds a backend.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backends.push(backend);
        self
    }

    /// Adds backends.
    pub fn backends(mut self, backends: impl IntoIterator<Item = Backend>) -> Self {
        self.backends.extend(backends);
        self
    }

    /// The retry policy (default [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The retry budget (default [`RetryBudget::default`]).
    pub fn retry_budget(mut self, budget: RetryBudget) -> Self {
        self.retry_budget = Some(budget);
        self
    }

    /// The routing policy: cooldowns, blocks, breakers, hedging (default
    /// [`RoutePolicy::default`]).
    pub fn route(mut self, policy: RoutePolicy) -> Self {
        self.route = policy;
        self
    }

    /// The per-backend limiter settings (default [`AdaptiveConcurrencyLayer::default`]): each
    /// backend gets its own limit and pacer with its limit and pacing settings, its token
    /// estimator and its queue timeout. (Its queue capacity is the layer's own: a stack's queued
    /// calls each wait in their caller's future, for at most the queue timeout.)
    pub fn limit(mut self, layer: AdaptiveConcurrencyLayer) -> Self {
        self.limit = Some(layer);
        self
    }

    /// Seeds every random choice (backend choice, jitter), so runs are reproducible.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Builds the stack over `client`. Fails when the backends do not check out
    /// ([`Backends::new`]).
    pub fn build<S>(self, client: S) -> Result<Stack<S>, ConfigError> {
        let backends = Backends::new(self.backends)?;
        let limit = self.limit.unwrap_or_default();
        let config = EngineConfig {
            retry: self.retry,
            budget: self.retry_budget.unwrap_or_default(),
            route: self.route,
            limit: *limit.limit_config(),
            pacing: *limit.pacing_config(),
            pacing_by_backend: Vec::new(),
            tokens: *limit.estimator(),
            queue_timeout: limit.queue_timeout(),
            seed: self.seed,
        };
        // Every attempt is a `tracing` event (and metrics), as in the layers.
        let engine = Engine::new(Some(backends), config)?.with_observer(crate::observe::emit);
        Ok(Stack {
            client,
            shared: Arc::new(Shared::new(engine)),
        })
    }
}

#[cfg(test)]
mod tests;
