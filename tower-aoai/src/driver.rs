//! What every tower driver in this crate needs from the runtime, written once.

use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::Request;
use http_body::Body;

use crate::limit::TokenEstimate;
use crate::policy::classify::{TransientKind, TransportError};
use crate::policy::route::{BackendId, Backends, RewriteError};
use crate::policy::{Outcome, TokenEstimator};

/// The current instant on tokio's clock (paused and advanced in tests), as the core takes it.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Takes the service that `poll_ready` made ready, to serve one call, and leaves a clone in its
/// place for the next (tower's idiom: a clone is not necessarily ready).
pub(crate) fn take_ready<S: Clone>(svc: &mut S) -> S {
    let clone = svc.clone();
    std::mem::replace(svc, clone)
}

/// How a response body's poll ended the body, if it did: read to its end (a success; a body that
/// knows it has ended ends with its last frame, not one poll later) or broken off by an error.
/// The one rule every body wrapper of this crate gives its permit back or reports a break by.
pub(crate) fn body_end<T, E>(
    polled: &Poll<Option<Result<T, E>>>,
    is_end_stream: impl FnOnce() -> bool,
) -> Option<Outcome> {
    match polled {
        Poll::Ready(None) => Some(Outcome::Success),
        Poll::Ready(Some(Err(_))) => Some(Outcome::Transient(TransientKind::Connect)),
        Poll::Ready(Some(Ok(_))) if is_end_stream() => Some(Outcome::Success),
        Poll::Ready(Some(Ok(_))) | Poll::Pending => None,
    }
}

/// What kind of transport failure an inner service's error is: a timeout if any error in its
/// source chain is a tokio or tower `Elapsed` or an I/O `TimedOut`, else a connection failure.
pub(crate) fn transport_error(error: &(dyn std::error::Error + 'static)) -> TransportError {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if e.is::<tokio::time::error::Elapsed>() || e.is::<tower::timeout::error::Elapsed>() {
            return TransportError::Timeout;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return TransportError::Timeout;
        }
        cur = e.source();
    }
    TransportError::Connect
}

/// The whole of a request body that is already in memory (`Full`, `String`, `Bytes`): a clone is
/// polled once per frame with a no-op waker. `None` when any frame is not ready at once or is an
/// error: such a body is never waited for.
pub(crate) fn in_memory_body<B>(body: &B) -> Option<Bytes>
where
    B: Body + Clone,
    B::Data: Buf,
{
    let mut body = pin!(body.clone());
    let mut cx = Context::from_waker(Waker::noop());
    // A body of one frame (the common `Full`) is handed back as that frame's `Bytes`, without a
    // copy; only a body of several frames is gathered into one buffer.
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(None) => {
                return Some(match first {
                    Some(first) if rest.is_empty() => first,
                    Some(first) => {
                        let mut all = BytesMut::with_capacity(first.len() + rest.len());
                        all.extend_from_slice(&first);
                        all.extend_from_slice(&rest);
                        all.freeze()
                    }
                    None => Bytes::new(),
                });
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(mut data) = frame.into_data() {
                    if first.is_none() {
                        let n = data.remaining();
                        first = Some(data.copy_to_bytes(n));
                    } else {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            rest.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => return None,
        }
    }
}

/// Bodies larger than this are not read to estimate their tokens (the estimate then assumes the
/// default completion budget and no prompt).
const MAX_ESTIMATED_BODY: u64 = 8 * 1024 * 1024;

/// The estimated tokens of a request: its [`TokenEstimate`] extension, else its body (when it is
/// a clonable body of known, bounded size that is all in memory), else the estimator's default.
/// A body that is not ready at once is estimated as if empty, never waited for.
pub(crate) fn estimate_tokens<B>(
    estimator: &TokenEstimator,
    extensions: &http::Extensions,
    body: &B,
) -> u64
where
    B: Body + Clone,
    B::Data: Buf,
{
    if let Some(TokenEstimate(tokens)) = extensions.get::<TokenEstimate>() {
        return *tokens;
    }
    if body
        .size_hint()
        .exact()
        .is_none_or(|n| n > MAX_ESTIMATED_BODY)
    {
        return estimator.estimate(b"");
    }
    in_memory_body(body).map_or_else(|| estimator.estimate(b""), |b| estimator.estimate(&b))
}

/// The request of one attempt to backend `id`: a copy of `parts` rewritten for it (URI, `host`,
/// the backend's own credentials in place of the caller's) with `body`, or the body with its
/// `model` replaced when the backend names another deployment.
pub(crate) fn rewrite_request<B>(
    backends: &Backends,
    id: BackendId,
    parts: &http::request::Parts,
    body: &B,
) -> Result<Request<B>, RewriteError>
where
    B: Body + From<Bytes> + Clone,
    B::Data: Buf,
{
    let bytes = if backends.rewrites_body(id, &parts.uri) {
        in_memory_body(body)
    } else {
        None
    };
    let (p, new_body) = backends.rewritten(id, parts, bytes.as_deref())?;
    Ok(Request::from_parts(
        p,
        new_body.map_or_else(|| body.clone(), B::from),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that names its cause as its source, as client errors wrapping I/O errors do.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("request failed")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn an_in_memory_body_is_read_and_a_pending_one_is_not_waited_for() {
        let full = http_body_util::Full::new(Bytes::from_static(b"{\"model\":\"x\"}"));
        assert_eq!(
            in_memory_body(&full).as_deref(),
            Some(&b"{\"model\":\"x\"}"[..])
        );
        #[derive(Clone)]
        struct Never;
        impl Body for Never {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                self: std::pin::Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
                Poll::Pending
            }
        }
        assert_eq!(in_memory_body(&Never), None);
        // Several frames come back as one buffer, in order.
        #[derive(Clone)]
        struct Frames(std::collections::VecDeque<&'static str>);
        impl Body for Frames {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
                Poll::Ready(
                    self.0
                        .pop_front()
                        .map(|s| Ok(http_body::Frame::data(Bytes::from_static(s.as_bytes())))),
                )
            }
        }
        let frames = Frames(["{\"a\":", "1", "}"].into());
        assert_eq!(in_memory_body(&frames).as_deref(), Some(&b"{\"a\":1}"[..]));
    }

    #[test]
    fn timeouts_are_found_anywhere_in_the_source_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow");
        assert_eq!(transport_error(&io), TransportError::Timeout);
        assert_eq!(transport_error(&Wrapped(io)), TransportError::Timeout);
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "no");
        assert_eq!(transport_error(&refused), TransportError::Connect);
    }
}
