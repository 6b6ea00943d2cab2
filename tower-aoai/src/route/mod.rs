//! Routing over several backends: failover, cooldowns, a 403 breaker, budgeted hedging.
//!
//! [`RouteLayer`] sends each call to one of several Azure OpenAI / OpenAI backends (regions,
//! deployments, provisioned and standard tiers), rewriting the request for the backend it chose
//! (scheme and host, the deployment path segment, the `model` of `/openai/v1/...` and
//! `/openai/responses` bodies, the auth header: a backend's key goes to that backend's host only).
//! Every decision is the [router core](crate::policy::route)'s; this layer carries them out:
//!
//! - the best tier's usable backends first (not cooling down, not behind an open breaker or a
//!   blocked resource, with room), power of two choices by headroom over load and recent
//!   latency;
//! - a 429 cools its backend down for the server's hint (jittered; 10 s without one) and the call
//!   **fails over at once** to another usable backend, no sleep; a 5xx, a connection error or a
//!   timeout fails over too and feeds the backend's failure-rate breaker (half-open probes);
//! - a 403 "temporarily blocked" takes the **whole resource** (every deployment behind that
//!   endpoint) out for an hour; when no other resource can serve, the caller gets a
//!   [`BlockedError`](crate::policy::route::BlockedError) whose `support_record()` reads like a
//!   support request (`apim-request-id`, region, resource, deployment, time, the response);
//! - when no backend is usable, the call waits until the first one comes back if that is within
//!   its deadline (the [`Deadline`](crate::retry::Deadline) extension, else 60 s), otherwise it
//!   returns the last response it got (or [`NoBackendError`] when it sent nothing);
//! - a call slower than its backend's p95 time to response headers is **hedged** to a different
//!   usable backend with room, within a 5 % budget; the first answer that ends the call wins and
//!   the other attempt is dropped (connection closed, permit released). Once response headers are
//!   handed up the call is committed: streams are never hedged or failed over mid-body;
//! - a success whose body then breaks off (a reset mid-stream) is a failure for its backend's
//!   breaker, reported by the [`RouteBody`] once; a body read to its end or dropped is not.
//!
//! # With the retry layer
//!
//! Failover happens *inside* one attempt of [`RetryLayer`](crate::RetryLayer): the retry layer
//! sits above, sees only what the router could not serve (the last 429 with its hint, a 5xx, a
//! [`NoBackendError`]) and waits and tries again by its own policy; the router's state
//! (cooldowns, breakers, blocks) persists between those attempts. [`crate::stack`] builds the
//! same policies as one service over the engine, cheaper per call than the layers composed.
//!
//! Figures on the simulator (single backend vs. failover vs. failover with hedging, with the
//! command that prints them) are in `tower-aoai/ROUTING.md`.
//!
//! The request body must be in memory and `Clone` (`Full<Bytes>`): it is replayed for failover and
//! hedges, and its `model` rewritten where the URL carries none.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_aoai::policy::route::{Backend, Backends, RoutePolicy};
//! use tower_aoai::route::RouteLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let backends = Backends::new(vec![
//!     Backend::new("east", "https://east.example.com").with_api_key("east-key").with_deployment("gpt-4o"),
//!     Backend::new("west", "https://west.example.com").with_api_key("west-key").with_deployment("gpt-4o"),
//! ])?;
//! let layer = RouteLayer::new(backends, RoutePolicy::default()).with_seed(1);
//!
//! // East is at capacity; west answers.
//! let client = service_fn(|req: Request<Full<Bytes>>| async move {
//!     let status = match req.uri().host() {
//!         Some("east.example.com") => StatusCode::TOO_MANY_REQUESTS,
//!         _ => StatusCode::OK,
//!     };
//!     let key = req.headers()["api-key"].to_str().unwrap().to_owned();
//!     Ok::<_, Infallible>(Response::builder().status(status).header("served-with", key)
//!         .body(Full::new(Bytes::from_static(b"{}"))).unwrap())
//! });
//! let svc = ServiceBuilder::new().layer(layer.clone()).service(client);
//! for _ in 0..3 {
//!     let req = Request::post("https://any.example/openai/deployments/x/chat/completions")
//!         .header("api-key", "caller-key")
//!         .body(Full::new(Bytes::from_static(b"{}")))?;
//!     let res = svc.clone().oneshot(req).await?;
//!     assert_eq!(res.status(), StatusCode::OK);
//!     assert_eq!(res.headers()["served-with"], "west-key");
//! }
//! assert!(layer.stats().attempts <= 4, "east cooled down after its first 429");
//! # Ok(()) }
//! ```

mod body;
mod layer;
mod service;

pub use crate::future::ResponseFuture;
pub use body::RouteBody;
pub use layer::{Headroom, RouteLayer};
pub use service::{NoBackendError, Route};

#[cfg(test)]
mod tests;
