use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::service::PermitGuard;
use crate::driver::body_end;
use crate::policy::Outcome;
use crate::stack::LeaseGuard;

pin_project! {
    /// The response body of [`AdaptiveConcurrency`](super::AdaptiveConcurrency) and of the
    /// [`Stack`](crate::stack::Stack): the inner body, untouched, holding the attempt's permit
    /// until the body ends (a success counts then) or is dropped (the attempt is counted as
    /// cancelled). A streaming response keeps its slot for as long as the stream runs, which is
    /// what the service is working on.
    #[derive(Debug)]
    pub struct LimitBody<B> {
        #[pin]
        inner: B,
        guard: Option<Held>,
    }
}

/// What a body holds until it ends: a limiter's permit, or a lease on a permit of the
/// [`Stack`](crate::stack::Stack)'s engine.
#[derive(Debug)]
enum Held {
    Permit(PermitGuard),
    Lease(LeaseGuard),
}

impl Held {
    fn finish(self, outcome: Outcome) {
        match self {
            Held::Permit(guard) => guard.finish(outcome),
            Held::Lease(guard) => guard.finish(outcome),
        }
    }
}

impl<B: Body> LimitBody<B> {
    pub(super) fn new(inner: B, guard: Option<PermitGuard>) -> Self {
        Self::holding(inner, guard.map(Held::Permit))
    }

    /// A body that holds nothing (its attempt's permit already went back).
    pub(crate) fn free(inner: B) -> Self {
        Self::holding(inner, None)
    }

    /// A body that holds the lease of a success until it ends.
    pub(crate) fn leased(inner: B, lease: LeaseGuard) -> Self {
        Self::holding(inner, Some(Held::Lease(lease)))
    }

    fn holding(inner: B, guard: Option<Held>) -> Self {
        let mut body = Self { inner, guard };
        if body.inner.is_end_stream() {
            body.finish(Outcome::Success);
        }
        body
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(guard) = self.guard.take() {
            guard.finish(outcome);
        }
    }
}

impl<B> LimitBody<B> {
    /// Whether the body still holds its permit.
    pub fn holds_permit(&self) -> bool {
        self.guard.is_some()
    }

    /// The inner body; the permit is given back (as cancelled, if the body had not ended).
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for LimitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = inner.as_mut().poll_frame(cx);
        if let Some(outcome) = body_end(&polled, || inner.is_end_stream())
            && let Some(guard) = this.guard.take()
        {
            guard.finish(outcome);
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
