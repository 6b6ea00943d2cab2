//! The layer under tokio's paused clock, against `tower_test::mock`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt};
use tower_layer::Layer;
use tower_test::mock::{self, Mock};

use super::*;
use crate::policy::{LimitConfig, PacingConfig};
use crate::retry::{Deadline, RetryBody};

/// A response body fed by a channel: it ends when the sender is dropped.
#[derive(Debug)]
struct TestBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

type Req = Request<Full<Bytes>>;
type Res = Response<TestBody>;
type Svc = AdaptiveConcurrency<Mock<Req, Res>>;
type Call = JoinHandle<Result<Response<LimitBody<RetryBody<TestBody>>>, BoxError>>;

fn stream() -> (mpsc::UnboundedSender<Bytes>, TestBody) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, TestBody { rx })
}

fn respond(status: u16, headers: &[(&'static str, &str)]) -> (mpsc::UnboundedSender<Bytes>, Res) {
    let (tx, body) = stream();
    let mut res = Response::builder().status(StatusCode::from_u16(status).unwrap());
    for (k, v) in headers {
        res = res.header(*k, *v);
    }
    (tx, res.body(body).unwrap())
}

fn fixed(n: u32) -> LimitConfig {
    LimitConfig::new().with_min(1).with_initial(n).with_max(n)
}

fn service(
    limit: LimitConfig,
    pacing: PacingConfig,
    queue: usize,
    timeout: Duration,
) -> (Svc, mock::Handle<Req, Res>) {
    let (mock, handle) = mock::pair::<Req, Res>();
    let layer = AdaptiveConcurrencyLayer::new(limit, pacing)
        .unwrap()
        .with_queue(queue, timeout)
        .unwrap();
    (layer.layer(mock), handle)
}

fn request(body: &'static [u8]) -> Req {
    Request::new(Full::new(Bytes::from_static(body)))
}

async fn call(svc: &mut Svc, req: Req) -> Call {
    let fut = svc.ready().await.unwrap().call(req);
    let call = tokio::spawn(fut);
    // Let the call reach the queue or the backend.
    settle().await;
    call
}

async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn overloaded(
    result: Result<Response<LimitBody<RetryBody<TestBody>>>, BoxError>,
) -> OverloadReason {
    match result {
        Ok(res) => panic!("expected Overloaded, got a response {}", res.status()),
        Err(e) => {
            e.downcast_ref::<Overloaded>()
                .expect("an Overloaded error")
                .reason
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_streaming_success_holds_its_permit_until_the_body_ends() {
    let (mut svc, mut handle) = service(fixed(1), PacingConfig::new(), 8, Duration::from_secs(60));
    let limiter = svc.handle();
    assert_eq!(limiter.room(), 1.0, "all of the limit is free");
    let a = call(&mut svc, request(b"{}")).await;
    let (_, send) = handle.next_request().await.unwrap();
    let (tx, res) = respond(200, &[]);
    send.send_response(res);
    let mut body = a.await.unwrap().unwrap().into_body();
    assert!(body.holds_permit());
    assert_eq!(limiter.snapshot().in_flight, 1);
    assert_eq!(limiter.room(), 0.0, "a call now would wait");

    // A second call waits while the stream runs, even for a long time.
    let b = call(&mut svc, request(b"{}")).await;
    tx.send(Bytes::from_static(b"data: {}\n\n")).unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(
        frame.into_data().unwrap(),
        Bytes::from_static(b"data: {}\n\n")
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(limiter.snapshot().in_flight, 1);
    assert_eq!(limiter.snapshot().queued, 1);
    assert!(handle.poll_request().is_pending());

    // The stream ends: the permit goes back and the waiting call is sent.
    drop(tx);
    assert!(body.frame().await.is_none());
    assert!(!body.holds_permit());
    let (_, send) = handle.next_request().await.unwrap();
    assert_eq!(limiter.snapshot().queued, 0);
    send.send_response(respond(200, &[]).1);
    drop(b.await.unwrap().unwrap());
    assert_eq!(limiter.snapshot().in_flight, 0);
    assert_eq!(limiter.room(), 1.0);
}

#[tokio::test(start_paused = true)]
async fn permits_are_released_on_cancellation_at_any_point() {
    let (mut svc, mut handle) = service(fixed(1), PacingConfig::new(), 8, Duration::from_secs(60));
    let limiter = svc.handle();

    // Dropped while in flight.
    let a = call(&mut svc, request(b"{}")).await;
    let (_req, _send) = handle.next_request().await.unwrap();
    assert_eq!(limiter.snapshot().in_flight, 1);
    // Dropped while queued.
    let b = call(&mut svc, request(b"{}")).await;
    assert_eq!(limiter.snapshot().queued, 1);
    b.abort();
    assert!(b.await.unwrap_err().is_cancelled());
    assert_eq!(limiter.snapshot().queued, 0);
    a.abort();
    assert!(a.await.unwrap_err().is_cancelled());
    assert_eq!(limiter.snapshot().in_flight, 0);

    // Dropped mid-stream.
    let c = call(&mut svc, request(b"{}")).await;
    let (_, send) = handle.next_request().await.unwrap();
    let (tx, res) = respond(200, &[]);
    send.send_response(res);
    let body = c.await.unwrap().unwrap();
    assert_eq!(limiter.snapshot().in_flight, 1);
    drop(body);
    assert_eq!(limiter.snapshot().in_flight, 0);
    drop(tx);

    // The limit still admits a call at once.
    let d = call(&mut svc, request(b"{}")).await;
    assert!(handle.next_request().await.is_some());
    d.abort();
    let _ = d.await;
    assert_eq!(limiter.snapshot().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_returned_permit_wakes_the_first_in_line_only() {
    // 60 calls on one permit: 59 queue. Waking every queued call on every return would be
    // 59 + 58 + ... = 1,770 wake-ups; the first in line alone is 59, and each call starts the
    // moment the one before it ends, in the order they came.
    let slow = tower::service_fn(|_: Req| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
    });
    let svc = AdaptiveConcurrencyLayer::new(fixed(1), PacingConfig::default())
        .unwrap()
        .with_queue(100, Duration::from_secs(600))
        .unwrap()
        .layer(slow);
    let t0 = Instant::now();
    let calls: Vec<_> = (0..60)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let res = svc.oneshot(request(b"{}")).await.unwrap();
                res.into_body().collect().await.unwrap();
                Instant::now() - t0
            })
        })
        .collect();
    let mut took = Vec::new();
    for call in calls {
        took.push(call.await.unwrap());
    }
    let expected: Vec<Duration> = (1..=60).map(|k| Duration::from_millis(100 * k)).collect();
    assert_eq!(took, expected, "first come, first served, without a gap");
    let wakeups = svc
        .shared
        .wakeups
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!((59..=62).contains(&wakeups), "{wakeups} wake-ups");
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_is_overloaded_at_once() {
    let (mut svc, mut handle) = service(fixed(1), PacingConfig::new(), 1, Duration::from_secs(60));
    let _a = call(&mut svc, request(b"{}")).await;
    let _in_flight = handle.next_request().await.unwrap();
    let _b = call(&mut svc, request(b"{}")).await;
    let started = Instant::now();
    let c = call(&mut svc, request(b"{}")).await;
    assert_eq!(overloaded(c.await.unwrap()), OverloadReason::QueueFull);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(svc.handle().snapshot().queued, 1);
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_and_deadline_are_overloaded_not_hangs() {
    let (mut svc, mut handle) = service(fixed(1), PacingConfig::new(), 8, Duration::from_secs(5));
    let _a = call(&mut svc, request(b"{}")).await;
    let _in_flight = handle.next_request().await.unwrap();

    let started = Instant::now();
    let mut with_deadline = request(b"{}");
    with_deadline
        .extensions_mut()
        .insert(Deadline((started + Duration::from_secs(1)).into_std()));
    let b = call(&mut svc, with_deadline).await;
    let c = call(&mut svc, request(b"{}")).await;
    assert_eq!(overloaded(b.await.unwrap()), OverloadReason::Deadline);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(overloaded(c.await.unwrap()), OverloadReason::QueueTimeout);
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(svc.handle().snapshot().queued, 0);
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_throttles_is_one_cut() {
    let (mut svc, mut handle) = service(
        LimitConfig::new().with_initial(10),
        PacingConfig::new(),
        8,
        Duration::from_secs(60),
    );
    let limiter = svc.handle();
    let mut calls = Vec::new();
    for _ in 0..10 {
        calls.push(call(&mut svc, request(b"{}")).await);
    }
    for _ in 0..10 {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(respond(429, &[("policy-id", "DeploymentRatelimit-Token")]).1);
    }
    for c in calls {
        let res = c.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        // A failure gives its permit back when its headers arrive.
        assert!(!res.body().holds_permit());
    }
    let snap = limiter.snapshot();
    assert_eq!((snap.cuts, snap.limit, snap.in_flight), (1, 7, 0));

    // A throttle on an attempt sent after the cut is a new episode.
    let d = call(&mut svc, request(b"{}")).await;
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(respond(503, &[]).1);
    drop(d.await.unwrap().unwrap());
    assert_eq!(limiter.snapshot().cuts, 2);
}

/// Answers every request at once with `status` and `headers`, recording when each arrived.
fn answer_all(
    mut handle: mock::Handle<Req, Res>,
    headers: &'static [(&'static str, &'static str)],
) -> Arc<Mutex<Vec<Instant>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some((_, send)) = handle.next_request().await {
            log.lock().unwrap().push(Instant::now());
            let (tx, res) = respond(200, headers);
            drop(tx);
            send.send_response(res);
        }
    });
    seen
}

#[tokio::test(start_paused = true)]
async fn requests_are_paced_never_eleven_in_a_second_at_600_rpm() {
    let pacing = PacingConfig::new()
        .with_requests_per_minute(Some(600.0))
        .with_safety(1.0);
    let (mut svc, handle) = service(
        LimitConfig::new().with_initial(64),
        pacing,
        64,
        Duration::from_secs(60),
    );
    let seen = answer_all(handle, &[]);
    let mut calls = Vec::new();
    for _ in 0..25 {
        calls.push(call(&mut svc, request(b"{}")).await);
    }
    for c in calls {
        c.await
            .unwrap()
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap();
    }
    let times = seen.lock().unwrap().clone();
    assert_eq!(times.len(), 25);
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(100),
            "{:?}",
            pair[1] - pair[0]
        );
    }
    for (i, &start) in times.iter().enumerate() {
        let n = times[i..]
            .iter()
            .take_while(|&&t| t < start + Duration::from_secs(1))
            .count();
        assert!(n <= 10, "{n} requests in one second");
    }
    assert_eq!(times[24] - times[0], Duration::from_millis(2400));
}

#[tokio::test(start_paused = true)]
async fn tokens_are_paced_by_the_body_estimate() {
    let pacing = PacingConfig::new()
        .with_tokens_per_minute(Some(60_000.0))
        .with_safety(1.0);
    let (mut svc, handle) = service(LimitConfig::new(), pacing, 64, Duration::from_secs(60));
    let seen = answer_all(handle, &[]);
    // No prompt, 1,000 completion tokens: 1,000 tokens each, 1,000 tokens/s.
    let body: &'static [u8] = br#"{"messages":[],"max_tokens":1000}"#;
    let a = call(&mut svc, request(body)).await;
    let b = call(&mut svc, request(body)).await;
    let mut hinted = request(b"not even json");
    hinted.extensions_mut().insert(TokenEstimate(3000));
    let c = call(&mut svc, hinted).await;
    let d = call(&mut svc, request(body)).await;
    for x in [a, b, c, d] {
        x.await
            .unwrap()
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap();
    }
    let times = seen.lock().unwrap().clone();
    let gaps: Vec<_> = times.windows(2).map(|p| p[1] - p[0]).collect();
    assert_eq!(
        gaps,
        vec![
            Duration::from_secs(1),
            Duration::from_secs(1),
            Duration::from_secs(3)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_throttle_hint_holds_every_send() {
    let (mut svc, mut handle) = service(
        LimitConfig::new(),
        PacingConfig::new(),
        8,
        Duration::from_secs(60),
    );
    let limiter = svc.handle();
    let a = call(&mut svc, request(b"{}")).await;
    let (_, send) = handle.next_request().await.unwrap();
    let throttled_at = Instant::now();
    send.send_response(
        respond(
            429,
            &[
                ("retry-after-ms", "2000"),
                ("x-ratelimit-limit-requests", "1000"),
            ],
        )
        .1,
    );
    drop(a.await.unwrap().unwrap());
    assert_eq!(limiter.snapshot().held_for, Some(Duration::from_secs(2)));
    assert_eq!(limiter.snapshot().requests_per_minute, Some(6000.0));
    let _b = call(&mut svc, request(b"{}")).await;
    let _ = handle.next_request().await.unwrap();
    assert_eq!(throttled_at.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn transport_errors_release_without_a_cut() {
    let (mut svc, mut handle) = service(
        LimitConfig::new(),
        PacingConfig::new(),
        8,
        Duration::from_secs(60),
    );
    let limiter = svc.handle();
    let a = call(&mut svc, request(b"{}")).await;
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(std::io::Error::other("connection reset"));
    assert!(a.await.unwrap().is_err());
    let snap = limiter.snapshot();
    assert_eq!((snap.in_flight, snap.cuts), (0, 0));
}

#[test]
fn bad_queue_settings_name_the_field() {
    let err = AdaptiveConcurrencyLayer::default()
        .with_queue(8, Duration::ZERO)
        .unwrap_err();
    assert_eq!(err.field(), "queue_timeout");
    let err = AdaptiveConcurrencyLayer::new(LimitConfig::new().with_min(0), PacingConfig::new())
        .unwrap_err();
    assert_eq!(err.field(), "limit.min");
}

#[tokio::test(start_paused = true)]
async fn a_capacity_throttle_cuts_but_holds_no_one() {
    const PEAK: &[u8] = br#"{"error":{"code":"429","message":"The system is currently experiencing high demand and cannot process your request. Your request exceeds the maximum usage size allowed during peak load. Please retry after 20 seconds."}}"#;
    let (mut svc, mut handle) = service(
        LimitConfig::new().with_initial(8),
        PacingConfig::new(),
        8,
        Duration::from_secs(60),
    );
    let limiter = svc.handle();
    let a = call(&mut svc, request(b"{}")).await;
    let (_, send) = handle.next_request().await.unwrap();
    let (tx, res) = respond(429, &[("retry-after", "20")]);
    tx.send(Bytes::from_static(PEAK)).unwrap();
    drop(tx);
    send.send_response(res);
    let res = a.await.unwrap().unwrap();
    // The body read to classify it is handed on whole.
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], PEAK);
    let snap = limiter.snapshot();
    assert_eq!((snap.cuts, snap.held_for), (1, None));
    let started = Instant::now();
    let _b = call(&mut svc, request(b"{}")).await;
    assert!(handle.next_request().await.is_some());
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn under_the_retry_layer_every_attempt_is_measured() {
    let (mock, mut handle) = mock::pair::<Req, Res>();
    let limit =
        AdaptiveConcurrencyLayer::new(LimitConfig::new().with_initial(8), PacingConfig::new())
            .unwrap()
            .layer(mock);
    let limiter = limit.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(crate::RetryLayer::default().with_seed(7))
        .service(limit);
    let call = tokio::spawn(svc.oneshot(request(b"{}")));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(respond(429, &[("retry-after-ms", "500")]).1);
    let (_, send) = handle.next_request().await.unwrap();
    let (tx, res) = respond(200, &[]);
    drop(tx);
    send.send_response(res);
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    let snap = limiter.snapshot();
    assert_eq!((snap.cuts, snap.in_flight), (1, 0));
}
