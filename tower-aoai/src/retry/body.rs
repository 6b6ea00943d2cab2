use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::BoxError;

use crate::policy::classify::{self, Classification, MAX_ERROR_BODY, error_body_wait};

/// The response body of [`Retry`](super::Retry): the inner body untouched, or, for an error
/// response whose start was read to classify it, that start followed by the rest.
///
/// A body passed through adds one pointer to the inner body: what an error response replays is
/// boxed, so the common response stays small as it moves through the layers (each layer that
/// can read an error body wraps the body it returns in one of these).
#[derive(Debug)]
pub struct RetryBody<B> {
    replay: Option<Box<Replay>>,
    inner: B,
    inner_done: bool,
}

/// What an error body replays before the rest of the inner body.
#[derive(Debug, Default)]
struct Replay {
    prefix: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl<B> RetryBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            replay: None,
            inner,
            inner_done: false,
        }
    }

    fn prefix_len(&self) -> u64 {
        self.replay
            .as_ref()
            .and_then(|r| r.prefix.as_ref())
            .map_or(0, |p| p.len() as u64)
    }

    /// The inner body (after the already-read start, if any, has been consumed).
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> Body for RetryBody<B>
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
        if let Some(replay) = &mut this.replay {
            if let Some(prefix) = replay.prefix.take() {
                return Poll::Ready(Some(Ok(Frame::data(prefix))));
            }
            if let Some(trailers) = replay.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            this.replay = None;
        }
        if this.inner_done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.inner_done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.replay
            .as_ref()
            .is_none_or(|r| r.prefix.is_none() && r.trailers.is_none())
            && (self.inner_done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix_len();
        if self.inner_done {
            return SizeHint::with_exact(prefix);
        }
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(prefix));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(prefix));
        }
        hint
    }
}

/// Reads the start of an error body (at most [`MAX_ERROR_BODY`] bytes, for at most
/// [`error_body_wait`]: 10 s, never past the call's deadline) and returns it, with a body that replays it before the rest.
pub(crate) async fn read_error_body<B>(
    mut body: B,
    remaining: Option<Duration>,
) -> Result<(Bytes, RetryBody<B>), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let limit = error_body_wait(remaining);
    let mut prefix = BytesMut::new();
    let mut trailers = None;
    let mut done = false;
    let read = async {
        while prefix.len() < MAX_ERROR_BODY {
            match body.frame().await {
                None => {
                    done = true;
                    break;
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => prefix.extend_from_slice(&data),
                    Err(frame) => {
                        trailers = frame.into_trailers().ok();
                        done = true;
                        break;
                    }
                },
            }
        }
        Ok::<(), BoxError>(())
    };
    match tokio::time::timeout(limit, read).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!(
            read = prefix.len(),
            "tower_aoai: error body still arriving after {limit:?}; classifying on what arrived"
        ),
    }
    let prefix = prefix.freeze();
    let replay = Replay {
        prefix: (!prefix.is_empty()).then(|| prefix.clone()),
        trailers,
    };
    let body = RetryBody {
        replay: (replay.prefix.is_some() || replay.trailers.is_some()).then(|| Box::new(replay)),
        inner: body,
        inner_done: done,
    };
    Ok((prefix, body))
}

/// An attempt's response with its classification: what the retry, route and limit layers each
/// need before they decide.
pub(crate) struct Classified<B> {
    pub(crate) class: Classification,
    pub(crate) response: Response<RetryBody<B>>,
    /// The start of the body that was read to classify it (empty when none was).
    pub(crate) prefix: Bytes,
    /// When it was classified (wall clock).
    pub(crate) wall: SystemTime,
}

impl<B> Classified<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Classifies `res` on its status and headers alone; its body is passed through unread.
    pub(crate) fn unread(res: Response<B>) -> Self {
        let wall = SystemTime::now();
        let class = classify::classify_response(res.status(), res.headers(), None, wall);
        Self {
            class,
            response: res.map(RetryBody::passthrough),
            prefix: Bytes::new(),
            wall,
        }
    }

    /// Reads the start of `res`'s body ([`read_error_body`]), classifies the response with it,
    /// and replays it before the rest.
    pub(crate) async fn read(
        res: Response<B>,
        remaining: Option<Duration>,
    ) -> Result<Self, BoxError> {
        let (parts, body) = res.into_parts();
        let (prefix, body) = read_error_body(body, remaining).await?;
        let wall = SystemTime::now();
        let class = classify::classify_response(parts.status, &parts.headers, Some(&prefix), wall);
        Ok(Self {
            class,
            response: Response::from_parts(parts, body),
            prefix,
            wall,
        })
    }
}
