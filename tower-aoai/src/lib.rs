//! Tower middleware that keeps traffic to Azure OpenAI and OpenAI flowing when the service
//! throttles.
//!
//! Azure OpenAI answers 429 far below a deployment's quota (regional "high demand", RPM checked
//! over 1 s / 10 s windows, provisioned deployments failing fast at 100 %) and 403 "temporarily
//! blocked" after an idle-then-burst pattern. These layers act on what the service says:
//!
//! - [`retry`]: Retry-After-aware, budgeted retries ([`RetryLayer`]); on give-up the last real
//!   response comes back marked `x-should-retry: false`.
//! - [`limit`]: an adaptive concurrency limit tuned by 429 feedback, with GCRA pacing of requests
//!   and tokens and slow start after idle ([`AdaptiveConcurrencyLayer`]).
//! - [`route`]: failover across regions and deployments, provisioned tier first, cooldowns from the
//!   server's hints, a breaker per resource on 403, budgeted hedging ([`RouteLayer`]).
//! - [`stack`]: the recommended stack from one builder (retry → route/hedge → limit per backend →
//!   client), with [`Stack::stats`](stack::Stack::stats) and
//!   [`Stack::diagnose`](stack::Stack::diagnose).
//! - [`observe`]: per-backend counters, headroom and a diagnosis of *why* you were throttled;
//!   `tracing` events per attempt; `metrics` behind a feature.
//! - [`policy`]: the sans-IO core every layer (and the Python transports) defers to: pure state
//!   machines that take `now` and an injected RNG, property-tested under a virtual clock.
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_aoai::{AdaptiveConcurrencyLayer, RetryLayer};
//! # fn wrap<S>(client: S) -> impl Sized {
//! let svc = ServiceBuilder::new()
//!     .layer(RetryLayer::default()) // Retry-After aware, budgeted
//!     .layer(AdaptiveConcurrencyLayer::default()) // 429-driven limit, slow start after idle
//!     .service(client);
//! # svc }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod driver;
pub mod future;
pub mod limit;
pub mod observe;
pub mod policy;
pub mod retry;
pub mod route;
pub mod stack;

pub use limit::AdaptiveConcurrencyLayer;
pub use retry::RetryLayer;
pub use route::RouteLayer;
