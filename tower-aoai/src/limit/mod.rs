//! An adaptive concurrency limit and pacer for one Azure OpenAI / OpenAI backend.
//!
//! [`AdaptiveConcurrencyLayer`] sits *inside* the retry loop, next to the HTTP client, so it
//! measures every attempt. Before an attempt it waits, first come first served, for a permit from
//! the backend's [`AdaptiveLimit`](crate::policy::AdaptiveLimit) (slow start, one multiplicative
//! cut per throttling episode, decay after idle), then for the backend's
//! [`Pacer`](crate::policy::Pacer) (requests and estimated tokens spaced by GCRA, and held while a
//! server hint says wait). After it, it classifies the response from its status and headers (and,
//! for a 429 only, the start of its error body, which says whether the cause is the quota or
//! regional capacity; it is handed on whole) and feeds the outcome to the limit and the rate-limit
//! headers to the pacer. A success body is never read.
//!
//! - A **success** keeps its permit until its body ends or is dropped: a streaming response holds
//!   its slot for as long as the stream runs, since that is what the service is working on.
//! - A **failure** (429, 503, ...) gives its permit back as soon as its headers arrive; a throttle
//!   cuts the limit at once (once per episode). A quota, provisioned or unexplained 429's
//!   `retry-after` holds every send to the backend; a regional-capacity 429 or a 503 holds no one
//!   (the cut answers it, see [`Pacer::on_throttle`](crate::policy::Pacer::on_throttle)).
//! - A call that cannot wait gets a typed [`Overloaded`] error and nothing is sent: the queue is
//!   full, it waited the whole queue timeout, or waiting longer would pass its
//!   [`Deadline`](crate::retry::Deadline). It never hangs.
//! - Dropping the response future at any point (queued, paced, in flight) leaves the queue and
//!   gives the permit back.
//!
//! The request body is read only to estimate its tokens, and only when it is a clonable body of
//! known size (`Full<Bytes>`, `String`, ...); a [`TokenEstimate`] request extension skips that.
//!
//! Each service the layer builds has its own limiter (one per backend); clones of that service
//! share it, and [`AdaptiveConcurrency::handle`] reads it ([`LimiterSnapshot`]).
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//! use tower_aoai::AdaptiveConcurrencyLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let backend = service_fn(|_req: Request<Full<Bytes>>| async {
//!     let res = Response::builder()
//!         .header("x-ratelimit-limit-requests", "100")
//!         .body(Full::new(Bytes::from_static(b"{\"ok\":true}")))
//!         .unwrap();
//!     Ok::<_, Infallible>(res)
//! });
//! let mut svc = ServiceBuilder::new()
//!     .layer(AdaptiveConcurrencyLayer::default())
//!     .service(backend);
//! let limiter = svc.handle();
//!
//! let body = Full::new(Bytes::from_static(br#"{"messages":[],"max_tokens":100}"#));
//! let res = svc.ready().await.unwrap().call(Request::new(body)).await.unwrap();
//! // The response's body holds the attempt's permit until it ends ...
//! assert_eq!(limiter.snapshot().in_flight, 1);
//! let bytes = res.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(&bytes[..], b"{\"ok\":true}");
//! assert_eq!(limiter.snapshot().in_flight, 0);
//! // ... and the backend's request quota was learned from its headers (a count per 10 s window,
//! // until the `remaining` figures show another window).
//! assert_eq!(limiter.snapshot().requests_per_minute, Some(600.0));
//! # }
//! ```

mod body;
mod layer;
mod service;

pub use crate::future::ResponseFuture;
pub use body::LimitBody;
pub use layer::AdaptiveConcurrencyLayer;
pub use service::{
    AdaptiveConcurrency, LimiterHandle, LimiterSnapshot, OverloadReason, Overloaded, TokenEstimate,
};

#[cfg(test)]
mod tests;
