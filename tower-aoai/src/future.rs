//! The response future shared by the layers of this crate.
//!
//! A note on the layers' `fn f(..) -> impl Future { async move { .. } }` instead of `async fn`:
//! rustc keeps an `async fn`'s arguments twice in its future (as arguments and as the body's
//! locals), which made each call's future carry its request twice (1.2-1.7 KiB, past glibc's
//! small-allocation cache). An `async move` block uses its captured arguments in place.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::BoxError;

/// The response future of [`Retry`](crate::retry::Retry),
/// [`AdaptiveConcurrency`](crate::limit::AdaptiveConcurrency) and [`Route`](crate::route::Route).
///
/// Each layer's work for a call (attempts and waits; queueing, pacing and the attempt; picking,
/// hedging and failing over) is one `async` state machine behind a single allocation per call.
/// Dropping this future cancels the call at whatever point it is: attempts in flight are dropped
/// (their connections with them), permits go back, and the router counts them as cancelled.
pub struct ResponseFuture<T> {
    inner: Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>,
}

impl<T> ResponseFuture<T> {
    pub(crate) fn new(fut: impl Future<Output = Result<T, BoxError>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(fut),
        }
    }
}

impl<T> Future for ResponseFuture<T> {
    type Output = Result<T, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<T> fmt::Debug for ResponseFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
