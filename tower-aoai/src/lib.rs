//! Tower middleware that keeps traffic to Azure OpenAI and OpenAI flowing when the service
//! throttles.
//!
//! - [`retry`]: Retry-After-aware, budgeted retries ([`RetryLayer`]).
//! - [`policy`]: the sans-IO core every layer (and the Python transports) defers to.
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_aoai::RetryLayer;
//! # fn wrap<S>(client: S) -> tower_aoai::retry::Retry<S> {
//! let svc = ServiceBuilder::new().layer(RetryLayer::default()).service(client);
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
