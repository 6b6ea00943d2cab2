//! RetryLayer under paused tokio time, against `tower_test` mock backends.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_aoai::RetryLayer;
use tower_aoai::policy::{RetryBudget, RetryPolicy};
use tower_aoai::retry::{Deadline, Retry};
use tower_test::mock;

type Mock = mock::Mock<Request<Full<Bytes>>, Response<Full<Bytes>>>;
type Handle = mock::Handle<Request<Full<Bytes>>, Response<Full<Bytes>>>;

const QUOTA: &str = r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds."}}"#;
const BLOCKED: &str = r#"{"error":{"code":"Forbidden","message":"Your resource has been temporarily blocked because we detected unusual behavior."}}"#;

fn service(layer: RetryLayer) -> (Retry<Mock>, Handle) {
    let (mock, handle) = mock::pair();
    (layer.layer(mock), handle)
}

fn request() -> Request<Full<Bytes>> {
    Request::post("http://aoai.example/openai/deployments/gpt/chat/completions")
        .body(Full::new(Bytes::from_static(br#"{"messages":[]}"#)))
        .unwrap()
}

fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(status);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

async fn body_text<B>(res: Response<B>) -> String
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// No request is waiting at the mock (the channel may be closed once the service is gone).
fn no_request<Req, Res>(handle: &mut mock::Handle<Req, Res>) -> bool {
    !matches!(handle.poll_request(), std::task::Poll::Ready(Some(_)))
}

/// Lets spawned tasks run until they block on something (a timer or the mock).
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn waits_for_retry_after_ms_then_succeeds() {
    let (svc, mut handle) = service(RetryLayer::default().with_seed(1));
    let call = tokio::spawn(svc.oneshot(request()));

    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(response(429, &[("retry-after-ms", "1500")], QUOTA));
    let t429 = Instant::now();
    settle().await;

    // The hint is honoured (jittered upwards by at most 10 %): nothing before 1.5 s.
    tokio::time::advance(Duration::from_millis(1490)).await;
    settle().await;
    assert!(no_request(&mut handle), "retried before the hint");

    let (_, reply) = handle.next_request().await.unwrap();
    let waited = t429.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited <= Duration::from_millis(1650),
        "{waited:?}"
    );
    reply.send_response(response(200, &[], r#"{"ok":true}"#));

    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("x-should-retry").is_none());
    assert_eq!(body_text(res).await, r#"{"ok":true}"#);
}

#[tokio::test(start_paused = true)]
async fn gives_up_with_the_last_real_response_marked_final() {
    let policy = RetryPolicy::new().with_max_attempts(3).unwrap();
    let (svc, mut handle) = service(RetryLayer::new(policy).with_seed(2));
    let call = tokio::spawn(svc.oneshot(request()));

    for _ in 0..3 {
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_response(response(429, &[("retry-after", "1")], QUOTA));
    }
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["x-should-retry"], "false");
    assert_eq!(res.headers()["retry-after"], "1");
    // The body that was read to classify it is handed up whole.
    assert_eq!(body_text(res).await, QUOTA);
    settle().await;
    assert!(no_request(&mut handle), "a fourth attempt was made");
}

#[tokio::test(start_paused = true)]
async fn a_blocked_resource_is_not_retried() {
    let (svc, mut handle) = service(RetryLayer::default());
    let call = tokio::spawn(svc.oneshot(request()));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(response(403, &[("apim-request-id", "f6501a03")], BLOCKED));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(body_text(res).await, BLOCKED);
    settle().await;
    assert!(no_request(&mut handle));
}

#[tokio::test(start_paused = true)]
async fn connection_errors_back_off_then_recover() {
    let (svc, mut handle) = service(RetryLayer::default().with_seed(3));
    let call = tokio::spawn(svc.oneshot(request()));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_error(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "refused",
    ));
    let t0 = Instant::now();
    let (_, reply) = handle.next_request().await.unwrap();
    // Full jitter below the first ceiling (0.5 s).
    assert!(t0.elapsed() <= Duration::from_millis(500));
    reply.send_response(response(200, &[], "{}"));
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn the_last_transport_error_is_returned_on_give_up() {
    let policy = RetryPolicy::new().with_max_attempts(2).unwrap();
    let (svc, mut handle) = service(RetryLayer::new(policy));
    let call = tokio::spawn(svc.oneshot(request()));
    for _ in 0..2 {
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_error(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
    }
    let err: BoxError = call.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("reset"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_hint_beyond_the_callers_deadline_returns_at_once() {
    let (svc, mut handle) = service(RetryLayer::default());
    let mut req = request();
    req.extensions_mut().insert(Deadline(
        (Instant::now() + Duration::from_secs(5)).into_std(),
    ));
    let call = tokio::spawn(svc.oneshot(req));
    let (_, reply) = handle.next_request().await.unwrap();
    let t0 = Instant::now();
    reply.send_response(response(429, &[("retry-after", "20")], QUOTA));
    let res = call.await.unwrap().unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO, "it waited");
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["x-should-retry"], "false");
}

#[tokio::test(start_paused = true)]
async fn success_bodies_are_not_read_so_streams_stream() {
    let (mock, mut handle) = mock::pair::<Request<Full<Bytes>>, Response<StreamBody<_>>>();
    let svc = RetryLayer::default().layer(mock);
    let call = tokio::spawn(svc.oneshot(request()));
    let (_, reply) = handle.next_request().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, Infallible>>(4);
    let stream = tokio_stream_from(rx);
    reply.send_response(Response::new(StreamBody::new(stream)));
    // The response is handed up before the stream has produced anything.
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(
        b"data: 1\n\n",
    ))))
    .await
    .unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(
        frame.into_data().unwrap(),
        Bytes::from_static(b"data: 1\n\n")
    );
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(
        b"data: [DONE]\n\n",
    ))))
    .await
    .unwrap();
    drop(tx);
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(
        frame.into_data().unwrap(),
        Bytes::from_static(b"data: [DONE]\n\n")
    );
    assert!(body.frame().await.is_none());
}

/// A `Stream` over an mpsc receiver, without pulling in tokio-stream.
fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(start_paused = true)]
async fn a_huge_error_body_is_classified_on_its_start_and_returned_whole() {
    let policy = RetryPolicy::new().with_max_attempts(1).unwrap();
    let (svc, mut handle) = service(RetryLayer::new(policy));
    let call = tokio::spawn(svc.oneshot(request()));
    let (_, reply) = handle.next_request().await.unwrap();
    let huge = format!("{QUOTA}{}", " ".repeat(1 << 20));
    reply.send_response(response(429, &[], &huge));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.headers()["x-should-retry"], "false");
    assert_eq!(body_text(res).await.len(), huge.len());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_during_a_wait_stops_it() {
    let (mut svc, mut handle) = service(RetryLayer::default());
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(response(429, &[("retry-after", "2")], QUOTA));
    settle().await;
    call.abort();
    tokio::time::advance(Duration::from_secs(10)).await;
    settle().await;
    assert!(no_request(&mut handle), "a cancelled call retried");
}

#[tokio::test(start_paused = true)]
async fn the_budget_is_shared_by_every_call_of_the_layer() {
    // No reserve, 50 % of calls: two calls buy one retry between them.
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5).unwrap();
    let layer = RetryLayer::default().with_budget(budget).with_seed(4);
    let (svc, mut handle) = service(layer);

    let first = tokio::spawn(svc.clone().oneshot(request()));
    let second = tokio::spawn(svc.oneshot(request()));
    let mut hits = 0;
    // Both first attempts fail; exactly one retry is allowed; it fails too.
    for _ in 0..3 {
        let (_, reply) = handle.next_request().await.unwrap();
        hits += 1;
        reply.send_response(response(500, &[], "{}"));
    }
    let a = first.await.unwrap().unwrap();
    let b = second.await.unwrap().unwrap();
    settle().await;
    assert!(no_request(&mut handle));
    assert_eq!(hits, 3);
    assert_eq!(a.headers()["x-should-retry"], "false");
    assert_eq!(b.headers()["x-should-retry"], "false");
}

#[tokio::test(start_paused = true)]
async fn x_should_retry_false_from_the_server_is_final() {
    let (svc, mut handle) = service(RetryLayer::default());
    let call = tokio::spawn(svc.oneshot(request()));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(response(429, &[("x-should-retry", "false")], QUOTA));
    assert_eq!(
        call.await.unwrap().unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    settle().await;
    assert!(no_request(&mut handle));
}

#[tokio::test(start_paused = true)]
async fn stats_count_a_scripted_sequence_and_diagnose_capacity() {
    use tower_aoai::observe::StatsHandle;
    use tower_aoai::policy::diagnose::FindingKind;

    const PEAK: &str = r#"{"error":{"code":"429","message":"The system is currently experiencing high demand and cannot process your request. Your request exceeds the maximum usage size allowed during peak load. Please retry after 1 seconds."}}"#;
    let stats = StatsHandle::new();
    let (svc, mut handle) = service(RetryLayer::default().with_seed(5).with_stats(stats.clone()));
    let call = tokio::spawn(svc.oneshot(request()));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(response(
        200,
        &[
            ("x-ratelimit-remaining-tokens", "90000"),
            ("x-ratelimit-limit-tokens", "100000"),
            ("x-ms-region", "West Europe"),
            ("apim-request-id", "abc"),
        ],
        "{}",
    ));
    call.await.unwrap().unwrap();

    let (svc, mut handle) = service(RetryLayer::default().with_seed(5).with_stats(stats.clone()));
    let call = tokio::spawn(svc.oneshot(request()));
    for _ in 0..2 {
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_response(response(429, &[("retry-after-ms", "100")], PEAK));
    }
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(response(200, &[], "{}"));
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);

    let snapshot = stats.snapshot();
    let b = snapshot.backend("default").unwrap();
    assert_eq!((b.requests, b.successes, b.retries), (4, 2, 2));
    assert_eq!(b.throttled.capacity, 2);
    assert_eq!(b.throttled.total(), 2);
    assert_eq!(b.region.as_deref(), Some("West Europe"));
    assert_eq!(b.headroom.remaining_tokens, Some(90_000));
    let diagnosis = stats.diagnose();
    assert_eq!(diagnosis.kinds(), vec![FindingKind::Capacity]);
    assert!(
        diagnosis.to_string().contains("still had headroom"),
        "{diagnosis}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_limiters_refusal_is_returned_at_once() {
    use tower_aoai::limit::{OverloadReason, Overloaded};
    let (svc, mut handle) = service(RetryLayer::default());
    let call = tokio::spawn(svc.oneshot(request()));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_error(Overloaded {
        reason: OverloadReason::QueueFull,
    });
    let err = call.await.unwrap().unwrap_err();
    assert!(err.is::<Overloaded>(), "{err}");
    settle().await;
    assert!(no_request(&mut handle), "the refusal was retried");
}
