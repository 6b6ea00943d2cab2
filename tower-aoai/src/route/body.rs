use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tower::BoxError;

use super::layer::Shared;
use crate::driver::{body_end, now};
use crate::policy::Outcome;
use crate::policy::route::BackendId;
use crate::retry::RetryBody;

/// The response body of [`Route`](super::Route): the chosen backend's body, passed through.
///
/// A success's body that breaks off with an error after its headers tells the router, once: a
/// failure for that backend's breaker, so a region that resets its streams is left alone like one
/// that refuses connections. A body read to its end, or dropped by the caller, tells it nothing.
/// Error responses (429, 5xx, ...) were already counted on their headers and are not watched.
pub struct RouteBody<B> {
    inner: RetryBody<B>,
    /// Where a broken success body is reported; taken when reported (or when the body ended).
    watch: Option<Watch>,
}

/// The router that hears of a broken body, and the backend it came from.
struct Watch {
    shared: Arc<Shared>,
    backend: BackendId,
}

impl<B> RouteBody<B> {
    /// A success's body, reported to the router as failed if it breaks off.
    pub(super) fn watched(inner: RetryBody<B>, shared: Arc<Shared>, backend: BackendId) -> Self {
        Self {
            inner,
            watch: Some(Watch { shared, backend }),
        }
    }

    /// A body nobody hears about (an error response, already classified).
    pub(super) fn unwatched(inner: RetryBody<B>) -> Self {
        Self { inner, watch: None }
    }

    /// Whether a break in the body would still be reported to the router.
    pub fn is_watched(&self) -> bool {
        self.watch.is_some()
    }

    /// The inner body; the router hears nothing more of it.
    pub fn into_inner(self) -> RetryBody<B> {
        self.inner
    }
}

impl<B> Body for RouteBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match body_end(&polled, || this.inner.is_end_stream()) {
            // Ended: nothing left to report, and the router is let go of now.
            Some(Outcome::Success) => this.watch = None,
            Some(_) => {
                if let Some(watch) = this.watch.take() {
                    tracing::debug!(
                        backend = watch.backend.index(),
                        "tower_aoai: a success's body broke off; its backend's breaker hears it"
                    );
                    watch
                        .shared
                        .lock()
                        .router
                        .on_body_failed(watch.backend, now());
                }
            }
            None => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: fmt::Debug> fmt::Debug for RouteBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteBody")
            .field("inner", &self.inner)
            .field("watching", &self.watch.as_ref().map(|w| w.backend))
            .finish()
    }
}
