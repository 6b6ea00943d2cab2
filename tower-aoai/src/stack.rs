//! The recommended full stack, from one builder: retry → route/hedge → limit per backend →
//! client.
//!
//! - [`RetryLayer`] on top: Retry-After-aware, budgeted; it sees what the
//!   router could not serve (the last 429 with its hint, a 5xx, no usable backend) and waits and
//!   tries again. A 403 block ([`BlockedError`](crate::policy::route::BlockedError)) is final.
//! - [`RouteLayer`] below it: picks a backend, fails over at once inside one retry attempt,
//!   hedges slow calls, keeps blocked resources out. Its waits for a cooling backend never pass
//!   the retry policy's deadline (nor the caller's [`Deadline`](crate::retry::Deadline)).
//! - an [`AdaptiveConcurrencyLayer`] per backend below the router: each backend's own 429-driven
//!   limit and pacing, measured on every attempt. Its room is the router's headroom input: a
//!   backend at its limit is passed over for one of the same tier with room, or spills to the
//!   next tier, instead of queueing; a call its limiter refuses (queue full, deadline) fails over
//!   without counting against the backend's breaker.
//! - the client at the bottom, shared by every backend (requests are rewritten per backend).
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

use std::task::{Context, Poll};
use std::time::SystemTime;

use tower_layer::Layer;
use tower_service::Service;

use crate::limit::{AdaptiveConcurrency, AdaptiveConcurrencyLayer, LimiterHandle};
use crate::observe::StatsHandle;
use crate::policy::diagnose::{self, Diagnosis};
use crate::policy::route::{Backend, BackendId, Backends, RoutePolicy, RouteStats};
use crate::policy::stats::{Gauges, Stats, router_gauges};
use crate::policy::{ConfigError, RetryBudget, RetryPolicy};
use crate::retry::{Retry, RetryLayer};
use crate::route::{Route, RouteLayer};

/// The composed service of a [`Stack`] over a client `S`.
pub type StackService<S> = Retry<Route<AdaptiveConcurrency<S>>>;

/// The full stack over a client `S`. Build it with [`Stack::builder`].
#[derive(Debug, Clone)]
pub struct Stack<S> {
    inner: StackService<S>,
    route: RouteLayer,
    limiters: Vec<LimiterHandle>,
    stats: StatsHandle,
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
        let now = std::time::Instant::now();
        let wall = SystemTime::now();
        self.route.inspect(|router| {
            self.stats.with(|stats| {
                for id in router.backends().ids() {
                    let limiter = self.limiters[id.index()].snapshot();
                    let gauges = Gauges {
                        limit: Some(limiter.limit),
                        in_flight: limiter.in_flight,
                        queue_depth: u32::try_from(limiter.queued).unwrap_or(u32::MAX),
                        ..router_gauges(router, id, now, wall)
                    };
                    stats.set_gauges(router.backends().get(id).name(), gauges);
                }
                stats.clone()
            })
        })
    }

    /// Why throttling happened, from the stats: quota, capacity, provisioned or region, with the
    /// figures, and the support record of every 403 block.
    pub fn diagnose(&self) -> Diagnosis {
        diagnose::diagnose(&self.stats())
    }

    /// The shared stats handle the route layer records into.
    pub fn stats_handle(&self) -> &StatsHandle {
        &self.stats
    }

    /// The router's counters (calls, attempts, hedges, cancellations, waits).
    pub fn route_stats(&self) -> RouteStats {
        self.route.stats()
    }

    /// The route layer, to inspect the shared router.
    pub fn route(&self) -> &RouteLayer {
        &self.route
    }

    /// The limiter of backend `id` (in the order the backends were given).
    pub fn limiter(&self, id: BackendId) -> &LimiterHandle {
        &self.limiters[id.index()]
    }

    /// The composed service.
    pub fn get_ref(&self) -> &StackService<S> {
        &self.inner
    }

    /// Consumes `self`, returning the composed service.
    pub fn into_inner(self) -> StackService<S> {
        self.inner
    }
}

impl<S, R> Service<R> for Stack<S>
where
    StackService<S>: Service<R>,
{
    type Response = <StackService<S> as Service<R>>::Response;
    type Error = <StackService<S> as Service<R>>::Error;
    type Future = <StackService<S> as Service<R>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.inner.call(req)
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

    /// The per-backend limiter (default [`AdaptiveConcurrencyLayer::default`]); each backend gets
    /// its own limit and pacer with these settings.
    pub fn limit(mut self, layer: AdaptiveConcurrencyLayer) -> Self {
        self.limit = Some(layer);
        self
    }

    /// Seeds every random choice (backend choice, jitter), so runs are reproducible.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Builds the stack over `client` (cloned once per backend). Fails when the backends do not
    /// check out ([`Backends::new`]).
    pub fn build<S: Clone>(self, client: S) -> Result<Stack<S>, ConfigError> {
        let backends = Backends::new(self.backends)?;
        let mut route_policy = self.route;
        if let Some(deadline) = self.retry.deadline() {
            let wait = route_policy.max_wait().min(deadline);
            route_policy = route_policy.with_max_wait(wait);
        }
        let limit = self.limit.unwrap_or_default();
        let services: Vec<AdaptiveConcurrency<S>> = backends
            .ids()
            .map(|_| limit.layer(client.clone()))
            .collect();
        let limiters: Vec<LimiterHandle> = services.iter().map(|s| s.handle()).collect();
        let mut route = RouteLayer::new(backends, route_policy);
        let mut retry = RetryLayer::new(self.retry);
        if let Some(budget) = self.retry_budget {
            retry = retry.with_budget(budget);
        }
        if let Some(seed) = self.seed {
            route = route.with_seed(seed);
            retry = retry.with_seed(seed.wrapping_add(1));
        }
        let rooms = limiters.clone();
        let stats = StatsHandle::new();
        let route = route
            .with_headroom(move |id| rooms[id.index()].room())
            .with_stats(stats.clone());
        let inner = retry.layer(route.layer_each(services));
        Ok(Stack {
            inner,
            route,
            limiters,
            stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::Full;
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::policy::route::BlockedError;

    const BLOCKED: &str = r#"{"error":{"code":"Forbidden","message":"Your resource has been temporarily blocked because we detected unusual behavior."}}"#;

    fn req() -> Request<Full<Bytes>> {
        Request::post("https://x.example/openai/deployments/d/chat/completions")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    }

    #[test]
    fn no_backends_is_a_config_error() {
        let err = Stack::builder()
            .build(service_fn(|_: Request<Full<Bytes>>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }))
            .unwrap_err();
        assert_eq!(err.field(), "backends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_block_is_final_and_reaches_the_caller_at_once() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let client = service_fn(move |_: Request<Full<Bytes>>| {
            h.fetch_add(1, Ordering::SeqCst);
            async {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(403)
                        .header("apim-request-id", "r-1")
                        .body(Full::new(Bytes::from_static(BLOCKED.as_bytes())))
                        .unwrap(),
                )
            }
        });
        let stack = Stack::builder()
            .backend(Backend::new("a", "https://a.example").with_api_key("k"))
            .seed(3)
            .build(client)
            .unwrap();
        let t0 = tokio::time::Instant::now();
        let err = stack.clone().oneshot(req()).await.unwrap_err();
        assert!(
            err.downcast_ref::<BlockedError>()
                .unwrap()
                .support_record()
                .contains("r-1")
        );
        assert_eq!(tokio::time::Instant::now(), t0, "no retry waits on a block");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_backend_throttles_the_router_waits_for_the_first_cooldown() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        // Both backends throttle for the first 4 attempts (2 s hints), then answer.
        let client = service_fn(move |_: Request<Full<Bytes>>| {
            let n = h.fetch_add(1, Ordering::SeqCst);
            async move {
                let res = if n < 4 {
                    Response::builder()
                        .status(429)
                        .header("retry-after-ms", "2000")
                        .body(Full::new(Bytes::from_static(b"{}")))
                } else {
                    Response::builder().body(Full::new(Bytes::from_static(b"{}")))
                };
                Ok::<_, Infallible>(res.unwrap())
            }
        });
        let stack = Stack::builder()
            .backend(Backend::new("a", "https://a.example"))
            .backend(Backend::new("b", "https://b.example"))
            .route(RoutePolicy::default().with_cooldown_jitter(0.0).unwrap())
            .seed(5)
            .build(client)
            .unwrap();
        let t0 = tokio::time::Instant::now();
        let res = stack.clone().oneshot(req()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        // a, b (both cool 2 s), wait, a, b (cool again), wait, a: OK. No sleeps but the cooldowns.
        assert_eq!(hits.load(Ordering::SeqCst), 5);
        assert_eq!(tokio::time::Instant::now() - t0, Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_at_its_limit_spills_to_the_next_tier_instead_of_queueing() {
        let client = service_fn(|req: Request<Full<Bytes>>| async move {
            let slow = req.uri().host() == Some("ptu.example");
            tokio::time::sleep(Duration::from_millis(if slow { 5_000 } else { 100 })).await;
            Ok::<_, Infallible>(
                Response::builder()
                    .header("x-served-by", req.uri().host().unwrap_or_default())
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap(),
            )
        });
        let stack = Stack::builder()
            .backend(Backend::new("ptu", "https://ptu.example").with_tier(0))
            .backend(Backend::new("paygo", "https://paygo.example").with_tier(1))
            .route(RoutePolicy::default().with_hedge(crate::policy::route::HedgePolicy::disabled()))
            .seed(9)
            .build(client)
            .unwrap();
        let ptu = stack.route().inspect(|r| r.backends().find("ptu").unwrap());
        let t0 = tokio::time::Instant::now();
        // Each limiter starts at 4: the PTU takes 4, the standard tier the other 4 at once.
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let svc = stack.clone();
                tokio::spawn(async move {
                    let res = svc.oneshot(req()).await.unwrap();
                    let by = res.headers()["x-served-by"].to_str().unwrap().to_owned();
                    (by, tokio::time::Instant::now() - t0)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let snapshot = stack.limiter(ptu).snapshot();
        assert_eq!(snapshot.queued, 0, "nobody queued behind the full PTU");
        let limit = snapshot.limit as usize;
        let mut on_ptu = 0;
        for call in calls {
            let (by, took) = call.await.unwrap();
            if by == "ptu.example" {
                on_ptu += 1;
            } else {
                assert!(took < Duration::from_secs(1), "{took:?}");
            }
        }
        assert_eq!(
            on_ptu, limit,
            "the PTU took exactly what its limiter had room for"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_losers_limiter_permit_is_released() {
        let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = slow.clone();
        let client = service_fn(move |req: Request<Full<Bytes>>| {
            let host = req.uri().host().unwrap_or_default().to_owned();
            let ms = match host.as_str() {
                "a.example" if s.load(Ordering::SeqCst) => 30_000,
                "a.example" => 100,
                _ => 50,
            };
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("x-served-by", host)
                        .body(Full::new(Bytes::from_static(b"{}")))
                        .unwrap(),
                )
            }
        });
        let stack = Stack::builder()
            .backend(Backend::new("a", "https://a.example").with_tier(0))
            .backend(Backend::new("b", "https://b.example").with_tier(1))
            .seed(11)
            .build(client)
            .unwrap();
        for _ in 0..40 {
            let res = stack.clone().oneshot(req()).await.unwrap();
            assert_eq!(res.headers()["x-served-by"], "a.example");
        }
        slow.store(true, Ordering::SeqCst);
        let res = stack.clone().oneshot(req()).await.unwrap();
        assert_eq!(res.headers()["x-served-by"], "b.example");
        let a = stack.route().inspect(|r| r.backends().find("a").unwrap());
        assert_eq!(
            stack.limiter(a).snapshot().in_flight,
            0,
            "the loser's permit came back"
        );
        assert_eq!(stack.route_stats().hedges, 1);
        assert_eq!(stack.route_stats().cancelled, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stats_and_diagnosis_per_backend() {
        use crate::policy::diagnose::FindingKind;
        const PEAK: &str = r#"{"error":{"code":"429","message":"The system is currently experiencing high demand and cannot process your request. Your request exceeds the maximum usage size allowed during peak load."}}"#;
        let client = service_fn(|req: Request<Full<Bytes>>| async move {
            let east = req.uri().host() == Some("east.example");
            let res = if east {
                Response::builder()
                    .status(429)
                    .header("retry-after-ms", "50")
                    .body(Full::new(Bytes::from_static(PEAK.as_bytes())))
            } else {
                Response::builder()
                    .header("x-ratelimit-remaining-tokens", "99000")
                    .header("x-ratelimit-limit-tokens", "100000")
                    .body(Full::new(Bytes::from_static(b"{}")))
            };
            Ok::<_, Infallible>(res.unwrap())
        });
        let stack = Stack::builder()
            .backend(
                Backend::new("east", "https://east.example")
                    .with_region("eastus2")
                    .with_api_key("east-secret-key")
                    .with_tier(0),
            )
            .backend(
                Backend::new("west", "https://west.example")
                    .with_region("westeurope")
                    .with_api_key("west-secret-key")
                    .with_tier(1),
            )
            .seed(3)
            .build(client)
            .unwrap();
        for _ in 0..20 {
            let res = stack.clone().oneshot(req()).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        let stats = stack.stats();
        let east = stats.backend("east").unwrap();
        let west = stats.backend("west").unwrap();
        assert_eq!(east.throttled.capacity, east.requests);
        assert!(east.requests >= 1);
        assert_eq!(west.successes, 20);
        assert_eq!(west.headroom.remaining_tokens, Some(99_000));
        assert_eq!(west.gauges.in_flight, 0);
        assert_eq!(west.gauges.breaker, Some("closed"));
        let diagnosis = stack.diagnose();
        assert!(
            diagnosis.kinds().contains(&FindingKind::Capacity),
            "{diagnosis}"
        );
        assert!(
            diagnosis.kinds().contains(&FindingKind::Region),
            "{diagnosis}"
        );
        let text = format!("{diagnosis}\n{stats:?}");
        assert!(!text.contains("secret-key"), "a key leaked: {text}");
    }
}
