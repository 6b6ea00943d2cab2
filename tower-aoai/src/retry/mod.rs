//! Retry-After-aware, budgeted retries for Azure OpenAI / OpenAI calls.
//!
//! [`RetryLayer`] wraps an HTTP client service (`http::Request<B>` → `http::Response<ResBody>`,
//! the tower-http convention). After every attempt the [policy core](crate::policy) classifies the
//! outcome (reading at most the first 16 KiB of an *error* body; success bodies, and so streams,
//! are never touched) and decides: return, wait and retry, or give up. Waits honour the server's
//! `retry-after-ms` / `retry-after` / `x-ratelimit-reset-*` hints (jittered slightly upwards), or
//! back off exponentially with full jitter; a wait that would pass the call's deadline ends the
//! retries at once, and a shared [`RetryBudget`](crate::policy::RetryBudget) keeps retries to a
//! share of traffic so a failing backend is not hammered.
//!
//! When it gives up on a retryable failure it returns the **last real response** with
//! `x-should-retry: false` added, so an SDK above it (the `openai` SDK honours that header) does
//! not multiply the attempts again. A transport error that is never followed by a response is
//! returned as the error.
//!
//! The request body must be `Clone` to be replayed (`Full<Bytes>`, `String`, ...).
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_aoai::RetryLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
//! let seen = hits.clone();
//! // A backend that throttles the first call with a 250 ms hint, then answers.
//! let backend = service_fn(move |_req: Request<Full<Bytes>>| {
//!     let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!     async move {
//!         let res = if n == 0 {
//!             Response::builder()
//!                 .status(StatusCode::TOO_MANY_REQUESTS)
//!                 .header("retry-after-ms", "250")
//!                 .body(Full::new(Bytes::from_static(b"{\"error\":{\"code\":\"429\"}}")))
//!         } else {
//!             Response::builder().body(Full::new(Bytes::from_static(b"{\"ok\":true}")))
//!         };
//!         Ok::<_, Infallible>(res.unwrap())
//!     }
//! });
//!
//! let svc = ServiceBuilder::new()
//!     .layer(RetryLayer::default())
//!     .service(backend);
//! let res = svc
//!     .oneshot(Request::new(Full::new(Bytes::from_static(b"{}"))))
//!     .await
//!     .unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(&body[..], b"{\"ok\":true}");
//! # }
//! ```

pub(crate) mod body;
mod layer;
mod service;

pub use crate::future::ResponseFuture;
pub use body::RetryBody;
pub use layer::RetryLayer;
pub use service::{Deadline, Retry};
