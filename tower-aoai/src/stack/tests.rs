use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{ServiceExt, service_fn};

use super::*;
use crate::policy::route::BlockedError;
use crate::policy::route::RoutePolicy;

const BLOCKED: &str = r#"{"error":{"code":"Forbidden","message":"Your resource has been temporarily blocked because we detected unusual behavior."}}"#;

fn req() -> Request<Full<Bytes>> {
    Request::post("https://x.example/openai/deployments/d/chat/completions")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

#[test]
fn no_backends_is_a_config_error() {
    let err = Stack::builder()
        .build(service_fn(|_: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }))
        .unwrap_err();
    assert_eq!(err.field(), "backends");
}

#[tokio::test(start_paused = true)]
async fn a_block_is_final_and_reaches_the_caller_at_once() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let client = service_fn(move |_: Request<Full<Bytes>>| {
        h.fetch_add(1, Ordering::SeqCst);
        async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(403)
                    .header("apim-request-id", "r-1")
                    .body(Full::new(Bytes::from_static(BLOCKED.as_bytes())))
                    .unwrap(),
            )
        }
    });
    let stack = Stack::builder()
        .backend(Backend::new("a", "https://a.example").with_api_key("k"))
        .seed(3)
        .build(client)
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let err = stack.clone().oneshot(req()).await.unwrap_err();
    assert!(
        err.downcast_ref::<BlockedError>()
            .unwrap()
            .support_record()
            .contains("r-1")
    );
    assert_eq!(tokio::time::Instant::now(), t0, "no retry waits on a block");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn when_every_backend_throttles_the_router_waits_for_the_first_cooldown() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    // Both backends throttle for the first 4 attempts (2 s hints), then answer.
    let client = service_fn(move |_: Request<Full<Bytes>>| {
        let n = h.fetch_add(1, Ordering::SeqCst);
        async move {
            let res = if n < 4 {
                Response::builder()
                    .status(429)
                    .header("retry-after-ms", "2000")
                    .body(Full::new(Bytes::from_static(b"{}")))
            } else {
                Response::builder().body(Full::new(Bytes::from_static(b"{}")))
            };
            Ok::<_, Infallible>(res.unwrap())
        }
    });
    let stack = Stack::builder()
        .backend(Backend::new("a", "https://a.example"))
        .backend(Backend::new("b", "https://b.example"))
        .route(RoutePolicy::default().with_cooldown_jitter(0.0).unwrap())
        .seed(5)
        .build(client)
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let res = stack.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // a, b (both cool 2 s), wait, a, b (cool again), wait, a: OK. No sleeps but the cooldowns.
    assert_eq!(hits.load(Ordering::SeqCst), 5);
    assert_eq!(tokio::time::Instant::now() - t0, Duration::from_secs(4));
}

#[tokio::test(start_paused = true)]
async fn a_backend_at_its_limit_spills_to_the_next_tier_instead_of_queueing() {
    let client = service_fn(|req: Request<Full<Bytes>>| async move {
        let slow = req.uri().host() == Some("ptu.example");
        tokio::time::sleep(Duration::from_millis(if slow { 5_000 } else { 100 })).await;
        Ok::<_, Infallible>(
            Response::builder()
                .header("x-served-by", req.uri().host().unwrap_or_default())
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
    });
    let stack = Stack::builder()
        .backend(Backend::new("ptu", "https://ptu.example").with_tier(0))
        .backend(Backend::new("paygo", "https://paygo.example").with_tier(1))
        .route(RoutePolicy::default().with_hedge(crate::policy::route::HedgePolicy::disabled()))
        .seed(9)
        .build(client)
        .unwrap();
    let t0 = tokio::time::Instant::now();
    // Each limiter starts at 4: the PTU takes 4, the standard tier the other 4 at once.
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let svc = stack.clone();
            tokio::spawn(async move {
                let res = svc.oneshot(req()).await.unwrap();
                let by = res.headers()["x-served-by"].to_str().unwrap().to_owned();
                (by, tokio::time::Instant::now() - t0)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let ptu = stack.stats().backend("ptu").unwrap().gauges.clone();
    assert_eq!(ptu.queue_depth, 0, "nobody queued behind the full PTU");
    let limit = ptu.limit.unwrap() as usize;
    let mut on_ptu = 0;
    for call in calls {
        let (by, took) = call.await.unwrap();
        if by == "ptu.example" {
            on_ptu += 1;
        } else {
            assert!(took < Duration::from_secs(1), "{took:?}");
        }
    }
    assert_eq!(
        on_ptu, limit,
        "the PTU took exactly what its limiter had room for"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hedge_losers_limiter_permit_is_released() {
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = slow.clone();
    let client = service_fn(move |req: Request<Full<Bytes>>| {
        let host = req.uri().host().unwrap_or_default().to_owned();
        let ms = match host.as_str() {
            "a.example" if s.load(Ordering::SeqCst) => 30_000,
            "a.example" => 100,
            _ => 50,
        };
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, Infallible>(
                Response::builder()
                    .header("x-served-by", host)
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap(),
            )
        }
    });
    let stack = Stack::builder()
        .backend(Backend::new("a", "https://a.example").with_tier(0))
        .backend(Backend::new("b", "https://b.example").with_tier(1))
        .seed(11)
        .build(client)
        .unwrap();
    for _ in 0..40 {
        let res = stack.clone().oneshot(req()).await.unwrap();
        assert_eq!(res.headers()["x-served-by"], "a.example");
    }
    slow.store(true, Ordering::SeqCst);
    let res = stack.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.headers()["x-served-by"], "b.example");
    assert_eq!(
        stack.stats().backend("a").unwrap().gauges.in_flight,
        0,
        "the loser's permit came back"
    );
    assert_eq!(stack.route_stats().hedges, 1);
    assert_eq!(stack.route_stats().cancelled, 1);
}

#[tokio::test(start_paused = true)]
async fn stats_and_diagnosis_per_backend() {
    use crate::policy::diagnose::FindingKind;
    const PEAK: &str = r#"{"error":{"code":"429","message":"The system is currently experiencing high demand and cannot process your request. Your request exceeds the maximum usage size allowed during peak load."}}"#;
    let client = service_fn(|req: Request<Full<Bytes>>| async move {
        let east = req.uri().host() == Some("east.example");
        let res = if east {
            Response::builder()
                .status(429)
                .header("retry-after-ms", "50")
                .body(Full::new(Bytes::from_static(PEAK.as_bytes())))
        } else {
            Response::builder()
                .header("x-ratelimit-remaining-tokens", "99000")
                .header("x-ratelimit-limit-tokens", "100000")
                .body(Full::new(Bytes::from_static(b"{}")))
        };
        Ok::<_, Infallible>(res.unwrap())
    });
    let stack = Stack::builder()
        .backend(
            Backend::new("east", "https://east.example")
                .with_region("eastus2")
                .with_api_key("east-secret-key")
                .with_tier(0),
        )
        .backend(
            Backend::new("west", "https://west.example")
                .with_region("westeurope")
                .with_api_key("west-secret-key")
                .with_tier(1),
        )
        .seed(3)
        .build(client)
        .unwrap();
    for _ in 0..20 {
        let res = stack.clone().oneshot(req()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    let stats = stack.stats();
    let east = stats.backend("east").unwrap();
    let west = stats.backend("west").unwrap();
    assert_eq!(east.throttled.capacity, east.requests);
    assert!(east.requests >= 1);
    assert_eq!(west.successes, 20);
    assert_eq!(west.headroom.remaining_tokens, Some(99_000));
    assert_eq!(west.gauges.in_flight, 0);
    assert_eq!(west.gauges.breaker, Some("closed"));
    let diagnosis = stack.diagnose();
    assert!(
        diagnosis.kinds().contains(&FindingKind::Capacity),
        "{diagnosis}"
    );
    assert!(
        diagnosis.kinds().contains(&FindingKind::Region),
        "{diagnosis}"
    );
    let text = format!("{diagnosis}\n{stats:?}");
    assert!(!text.contains("secret-key"), "a key leaked: {text}");
}

/// A client that answers every request after `ms` of (virtual) time.
fn slow_ok(
    ms: u64,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ Sync
+ 'static {
    service_fn(move |_: Request<Full<Bytes>>| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
    })
}

/// A stack over `client` with one backend "a" whose limit is `limit` (fixed) and whose calls
/// wait at most `queue_timeout` for a permit.
fn one_limited_backend<S>(limit: u32, queue_timeout: Duration, client: S) -> Stack<S> {
    let config = crate::policy::LimitConfig::default()
        .with_initial(limit)
        .with_min(1)
        .with_max(limit);
    let layer =
        crate::limit::AdaptiveConcurrencyLayer::new(config, crate::policy::PacingConfig::default())
            .unwrap()
            .with_queue(16, queue_timeout)
            .unwrap();
    Stack::builder()
        .backend(Backend::new("a", "https://a.example"))
        .limit(layer)
        .seed(1)
        .build(client)
        .unwrap()
}

fn gauges(stack: &Stack<impl Sized>, name: &str) -> crate::policy::stats::Gauges {
    stack.stats().backend(name).unwrap().gauges.clone()
}

/// Sends a request through `stack` on a task of its own and reads the whole body; the task
/// returns how long after `t0` the body ended.
fn spawn_timed<S>(stack: &Stack<S>, t0: tokio::time::Instant) -> tokio::task::JoinHandle<Duration>
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let svc = stack.clone();
    tokio::spawn(async move {
        let res = svc.oneshot(req()).await.unwrap();
        res.into_body().collect().await.unwrap();
        tokio::time::Instant::now() - t0
    })
}

#[tokio::test(start_paused = true)]
async fn a_full_backend_queues_and_a_returned_permit_wakes_the_next_call() {
    let stack = one_limited_backend(2, Duration::from_secs(30), slow_ok(100));
    let t0 = tokio::time::Instant::now();
    let calls: Vec<_> = (0..4).map(|_| spawn_timed(&stack, t0)).collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let g = gauges(&stack, "a");
    assert_eq!((g.in_flight, g.queue_depth), (2, 2), "{g:?}");
    let mut took: Vec<Duration> = Vec::new();
    for call in calls {
        took.push(call.await.unwrap());
    }
    took.sort();
    // Two at once, two woken when the first two give their permits back (not at a recheck).
    assert_eq!(
        took,
        [100, 100, 200, 200].map(Duration::from_millis).to_vec()
    );
    let g = gauges(&stack, "a");
    assert_eq!((g.in_flight, g.queue_depth), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_returned_permit_wakes_one_queued_call_not_all_of_them() {
    // 60 calls on one permit: 59 queue. Waking every queued call on every return would be
    // 59 + 58 + ... = 1,770 wake-ups; one per return is 59, and each call starts the moment
    // the one before it ends (no call waits for the engine's recheck).
    let stack = one_limited_backend(1, Duration::from_secs(600), slow_ok(100));
    let t0 = tokio::time::Instant::now();
    let calls: Vec<_> = (0..60).map(|_| spawn_timed(&stack, t0)).collect();
    let mut took = Vec::new();
    for call in calls {
        took.push(call.await.unwrap());
    }
    took.sort();
    let expected: Vec<Duration> = (1..=60).map(|k| Duration::from_millis(100 * k)).collect();
    assert_eq!(took, expected);
    let wakeups = stack
        .shared
        .wakeups
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!((59..=62).contains(&wakeups), "{wakeups} wake-ups");
    assert_eq!(gauges(&stack, "a").queue_depth, 0);
}

#[tokio::test(start_paused = true)]
async fn a_woken_call_that_fails_passes_the_wake_on() {
    // The call holding the only permit is answered 403 after 100 ms: the resource is blocked.
    // The permit it gives back wakes the first queued call, which fails (blocked) without
    // sending; it must pass the wake on, so the second fails at once too, not at the engine's
    // recheck a second later.
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let client = service_fn(move |_: Request<Full<Bytes>>| {
        h.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, Infallible>(
                Response::builder()
                    .status(403)
                    .body(Full::new(Bytes::from_static(BLOCKED.as_bytes())))
                    .unwrap(),
            )
        }
    });
    let stack = one_limited_backend(1, Duration::from_secs(600), client);
    let t0 = tokio::time::Instant::now();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let svc = stack.clone();
            tokio::spawn(async move {
                let err = svc.oneshot(req()).await.unwrap_err();
                assert!(err.downcast_ref::<BlockedError>().is_some(), "{err}");
                tokio::time::Instant::now() - t0
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), Duration::from_millis(100));
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "a blocked resource gets nothing more"
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_that_waits_past_the_queue_timeout_is_overloaded() {
    let stack = one_limited_backend(1, Duration::from_secs(2), slow_ok(10_000));
    let busy = tokio::spawn(stack.clone().oneshot(req()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let t0 = tokio::time::Instant::now();
    let err = stack.clone().oneshot(req()).await.unwrap_err();
    let overloaded = err.downcast_ref::<crate::limit::Overloaded>().unwrap();
    assert_eq!(
        overloaded.reason,
        crate::limit::OverloadReason::QueueTimeout
    );
    let waited = tokio::time::Instant::now() - t0;
    assert!(
        waited >= Duration::from_millis(1_990) && waited <= Duration::from_secs(2),
        "{waited:?}"
    );
    assert_eq!(gauges(&stack, "a").queue_depth, 0, "it left the queue");
    busy.abort();
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_gives_back_its_permit_and_its_place_in_the_queue() {
    let stack = one_limited_backend(1, Duration::from_secs(30), slow_ok(10_000));
    let sending = tokio::spawn(stack.clone().oneshot(req()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let queued = tokio::spawn(stack.clone().oneshot(req()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let g = gauges(&stack, "a");
    assert_eq!((g.in_flight, g.queue_depth), (1, 1));
    queued.abort();
    let _ = queued.await;
    assert_eq!(gauges(&stack, "a").queue_depth, 0, "the queued call left");
    sending.abort();
    let _ = sending.await;
    assert_eq!(gauges(&stack, "a").in_flight, 0, "the permit came back");
    assert_eq!(stack.route_stats().cancelled, 1);
}

#[tokio::test(start_paused = true)]
async fn a_success_holds_its_permit_until_its_body_ends() {
    let stack = Stack::builder()
        .backend(Backend::new("a", "https://a.example"))
        .seed(1)
        .build(service_fn(|_: Request<Full<Bytes>>| async {
            // A body that does not know it has ended until it is read.
            let body =
                http_body_util::StreamBody::new(futures_util::stream::iter([Ok::<_, Infallible>(
                    http_body::Frame::data(Bytes::from_static(b"data: {}\n\n")),
                )]));
            Ok::<_, Infallible>(Response::new(body))
        }))
        .unwrap();
    let res = stack.clone().oneshot(req()).await.unwrap();
    assert_eq!(gauges(&stack, "a").in_flight, 1, "streaming: still working");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"data: {}\n\n");
    assert_eq!(gauges(&stack, "a").in_flight, 0);
    let res = stack.clone().oneshot(req()).await.unwrap();
    drop(res);
    assert_eq!(
        gauges(&stack, "a").in_flight,
        0,
        "a dropped body gives it back"
    );
    assert_eq!(stack.stats().backend("a").unwrap().successes, 2);
}

#[tokio::test(start_paused = true)]
async fn giving_up_returns_the_last_answer_marked_not_to_retry() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let stack = Stack::builder()
        .backend(Backend::new("a", "https://a.example"))
        .retry(RetryPolicy::default().with_max_attempts(3).unwrap())
        .seed(1)
        .build(service_fn(move |_: Request<Full<Bytes>>| {
            h.fetch_add(1, Ordering::SeqCst);
            async {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(503)
                        .body(Full::new(Bytes::from_static(b"{\"error\":{}}")))
                        .unwrap(),
                )
            }
        }))
        .unwrap();
    let res = stack.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["x-should-retry"], "false");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    // The error body read to classify it is replayed whole.
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"{\"error\":{}}");
}

#[tokio::test(start_paused = true)]
async fn the_callers_deadline_bounds_the_wait_for_a_cooling_backend() {
    let stack = Stack::builder()
        .backend(Backend::new("a", "https://a.example"))
        .seed(1)
        .build(service_fn(|_: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(429)
                    .header("retry-after-ms", "5000")
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap(),
            )
        }))
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let mut r = req();
    r.extensions_mut().insert(crate::retry::Deadline(
        (t0 + Duration::from_secs(2)).into_std(),
    ));
    let res = stack.clone().oneshot(r).await.unwrap();
    // The hint outlasts the deadline: the 429 comes back at once, marked, with no wait.
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["x-should-retry"], "false");
    assert_eq!(tokio::time::Instant::now(), t0);
}

#[test]
fn debug_names_backends_and_never_a_key() {
    let stack = Stack::builder()
        .backend(Backend::new("east", "https://east.example").with_api_key("east-secret-key"))
        .build(slow_ok(1))
        .unwrap();
    let text = format!("{stack:?}");
    assert!(text.contains("east"), "{text}");
    assert!(!text.contains("secret"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn every_attempt_is_a_tracing_event_without_secrets() {
    let out = crate::observe::tests::Captured::default();
    let _quiet_elsewhere = out.set_default("tower_aoai::attempt=debug");
    let stack = Stack::builder()
        .backend(
            Backend::new("ptu", "https://ptu.example")
                .with_api_key("ptu-secret-key")
                .with_tier(0),
        )
        .backend(Backend::new("paygo", "https://paygo.example").with_tier(1))
        .seed(1)
        .build(service_fn(|req: Request<Full<Bytes>>| async move {
            let status = if req.uri().host() == Some("ptu.example") {
                429
            } else {
                200
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .header("apim-request-id", "req-7")
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap(),
            )
        }))
        .unwrap();
    let res = stack.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text = out.text();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("attempt")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("backend=\"ptu\""), "{text}");
    assert!(lines[0].contains("outcome=\"throttled_"), "{text}");
    assert!(lines[1].contains("backend=\"paygo\""), "{text}");
    assert!(lines[1].contains("outcome=\"success\""), "{text}");
    assert!(lines[1].contains("apim_request_id=\"req-7\""), "{text}");
    assert!(!text.contains("secret"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_new_call_does_not_take_a_permit_from_the_queued_ones() {
    let stack = one_limited_backend(1, Duration::from_secs(600), slow_ok(100));
    let t0 = tokio::time::Instant::now();
    // The only permit, held by an unread body.
    let holder = stack.clone().oneshot(req()).await.unwrap();
    let w1 = spawn_timed(&stack, t0);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let w2 = spawn_timed(&stack, t0);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(gauges(&stack, "a").queue_depth, 2);
    // The permit comes back (w1 is woken for it) and a new call asks before w1 looks: it
    // queues behind both.
    drop(holder);
    let mut fresh = Box::pin(stack.clone().oneshot(req()));
    tokio::select! {
        biased;
        _ = &mut fresh => unreachable!("the new call took the queued calls' permit"),
        _ = std::future::ready(()) => {}
    }
    let fresh = tokio::spawn(async move {
        let res = fresh.await.unwrap();
        res.into_body().collect().await.unwrap();
        tokio::time::Instant::now() - t0
    });
    let mut order = vec![
        ("new", fresh.await.unwrap()),
        ("w1", w1.await.unwrap()),
        ("w2", w2.await.unwrap()),
    ];
    order.sort_by_key(|(_, t)| *t);
    assert_eq!(
        order,
        [
            // The holder's answer came at 100 ms; its body was dropped at 102 ms.
            ("w1", Duration::from_millis(202)),
            ("w2", Duration::from_millis(302)),
            ("new", Duration::from_millis(402)),
        ]
    );
}
