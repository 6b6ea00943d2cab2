//! The route layer under paused time: failover, tiers, cooldowns, blocks, breakers, hedging.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt, service_fn};

use super::{NoBackendError, RouteLayer};
use crate::policy::route::{
    Backend, Backends, BlockedError, BreakerState, HedgePolicy, RoutePolicy,
};
use crate::retry::Deadline;

const BLOCKED: &str = r#"{"error":{"code":"Forbidden","message":"Your resource has been temporarily blocked because we detected unusual behavior."}}"#;

/// What a scripted backend answers: status, headers, body, and how long it takes.
#[derive(Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: &'static str,
    delay: Duration,
}

fn ok(delay_ms: u64) -> Answer {
    Answer {
        status: 200,
        headers: vec![],
        body: "{}",
        delay: Duration::from_millis(delay_ms),
    }
}

fn status(status: u16, headers: &[(&'static str, &str)], body: &'static str) -> Answer {
    Answer {
        status,
        headers: headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        body,
        delay: Duration::ZERO,
    }
}

/// Sets its flag when dropped before it answered: proves an attempt's future (and so its
/// connection) was dropped.
struct DropFlag(Arc<AtomicBool>, bool);
impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

type Script = Arc<dyn Fn(&str, usize) -> Answer + Send + Sync>;

/// A client whose answer depends on the host (and how many calls that host has seen); it records
/// every request's host and auth header, and which attempts were dropped before answering.
#[derive(Clone)]
struct Net {
    script: Arc<Mutex<Script>>,
    hits: Arc<Mutex<Vec<(String, String)>>>,
    dropped: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Net {
    fn new(script: impl Fn(&str, usize) -> Answer + Send + Sync + 'static) -> Self {
        Self {
            script: Arc::new(Mutex::new(Arc::new(script))),
            hits: Arc::default(),
            dropped: Arc::default(),
        }
    }

    fn set(&self, script: impl Fn(&str, usize) -> Answer + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Arc::new(script);
    }

    fn hits(&self, host: &str) -> usize {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|(h, _)| h == host)
            .count()
    }

    fn all_hits(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for (h, _) in self.hits.lock().unwrap().iter() {
            *m.entry(h.clone()).or_default() += 1;
        }
        m
    }
}

fn client(
    net: Net,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ Sync
+ 'static {
    service_fn(move |req: Request<Full<Bytes>>| {
        let host = req.uri().host().unwrap_or_default().to_owned();
        let auth = req
            .headers()
            .get("api-key")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let n = {
            let mut hits = net.hits.lock().unwrap();
            hits.push((host.clone(), auth));
            hits.iter().filter(|(h, _)| *h == host).count() - 1
        };
        let answer = (net.script.lock().unwrap().clone())(&host, n);
        let flag = Arc::new(AtomicBool::new(false));
        net.dropped.lock().unwrap().push(flag.clone());
        async move {
            let mut guard = DropFlag(flag, false);
            tokio::time::sleep(answer.delay).await;
            guard.1 = true;
            let mut b = Response::builder()
                .status(answer.status)
                .header("x-served-by", host);
            for (k, v) in &answer.headers {
                b = b.header(*k, v.as_str());
            }
            Ok::<_, Infallible>(
                b.body(Full::new(Bytes::from_static(answer.body.as_bytes())))
                    .unwrap(),
            )
        }
    })
}

fn request(deadline: Option<Duration>) -> Request<Full<Bytes>> {
    let mut req = Request::post(
        "https://caller.example/openai/deployments/any/chat/completions?api-version=2024-10-21",
    )
    .header("api-key", "CALLER-KEY")
    .body(Full::new(Bytes::from_static(b"{\"messages\":[]}")))
    .unwrap();
    if let Some(d) = deadline {
        req.extensions_mut()
            .insert(Deadline((Instant::now() + d).into_std()));
    }
    req
}

fn served_by<B>(res: &Response<B>) -> &str {
    res.headers()["x-served-by"].to_str().unwrap()
}

fn backend(name: &str, tier: u8) -> Backend {
    Backend::new(name, format!("https://{name}.example"))
        .with_api_key(format!("{name}-key"))
        .with_deployment("gpt-4o")
        .with_tier(tier)
}

fn layer(list: Vec<Backend>, policy: RoutePolicy) -> RouteLayer {
    RouteLayer::new(Backends::new(list).unwrap(), policy).with_seed(7)
}

fn no_hedge() -> RoutePolicy {
    RoutePolicy::default().with_hedge(HedgePolicy::disabled())
}

#[tokio::test(start_paused = true)]
async fn a_429_fails_over_at_once_and_keys_stay_with_their_hosts() {
    let net = Net::new(|host, _| match host {
        "east.example" => status(429, &[("retry-after-ms", "5000")], "{}"),
        _ => ok(0),
    });
    let layer = layer(vec![backend("east", 0), backend("west", 0)], no_hedge());
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(client(net.clone()));
    let t0 = Instant::now();
    for _ in 0..10 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(served_by(&res), "west.example");
    }
    assert_eq!(Instant::now(), t0, "failover never sleeps");
    assert!(net.hits("east.example") <= 1, "{:?}", net.all_hits());
    for (host, key) in net.hits.lock().unwrap().iter() {
        assert_eq!(key, &format!("{}-key", host.trim_end_matches(".example")));
    }
}

#[tokio::test(start_paused = true)]
async fn the_provisioned_tier_first_then_spillover_to_standard() {
    let ptu_full = Arc::new(AtomicBool::new(false));
    let full = ptu_full.clone();
    let net = Net::new(move |host, _| match host {
        "ptu.example" if full.load(Ordering::SeqCst) => status(
            429,
            &[
                ("retry-after-ms", "1000"),
                ("azure-openai-deployment-utilization", "102%"),
            ],
            "{}",
        ),
        _ => ok(0),
    });
    let layer = layer(
        vec![backend("ptu", 0), backend("std1", 1), backend("std2", 1)],
        no_hedge(),
    );
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(client(net.clone()));
    for _ in 0..20 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(served_by(&res), "ptu.example");
    }
    ptu_full.store(true, Ordering::SeqCst);
    let mut spilled = HashMap::<String, usize>::new();
    for _ in 0..40 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        *spilled.entry(served_by(&res).to_owned()).or_default() += 1;
    }
    assert_eq!(spilled.get("ptu.example"), None);
    assert!(
        spilled["std1.example"] > 5 && spilled["std2.example"] > 5,
        "{spilled:?}"
    );
    assert_eq!(
        net.hits("ptu.example"),
        21,
        "one 429, then the PTU cools down"
    );
    // Back after its cooldown (1 s + at most 10 % jitter).
    ptu_full.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_millis(1101)).await;
    let res = svc.clone().oneshot(request(None)).await.unwrap();
    assert_eq!(served_by(&res), "ptu.example");
}

#[tokio::test(start_paused = true)]
async fn with_every_backend_cooling_the_call_waits_for_the_first_within_its_deadline() {
    let net = Net::new(|host, n| match (host, n) {
        ("a.example", 0) => status(429, &[("retry-after-ms", "2000")], "{}"),
        ("b.example", 0) => status(429, &[("retry-after", "4")], "{}"),
        _ => ok(0),
    });
    let policy = no_hedge().with_cooldown_jitter(0.0).unwrap();
    let layer = layer(vec![backend("a", 0), backend("b", 0)], policy);
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(client(net.clone()));
    let t0 = Instant::now();
    let res = svc
        .clone()
        .oneshot(request(Some(Duration::from_secs(30))))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(served_by(&res), "a.example");
    assert_eq!(
        Instant::now() - t0,
        Duration::from_secs(2),
        "waited for a's cooldown exactly"
    );

    // A deadline shorter than every cooldown: the last response comes back, nothing is waited.
    net.set(|_, _| status(429, &[("retry-after-ms", "9000")], "{}"));
    tokio::time::advance(Duration::from_secs(5)).await;
    let t1 = Instant::now();
    let res = svc
        .clone()
        .oneshot(request(Some(Duration::from_secs(3))))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(Instant::now(), t1);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"{}", "the error body is handed up whole");
    // Nothing usable and nothing sent: a typed error.
    let err = svc
        .clone()
        .oneshot(request(Some(Duration::from_secs(3))))
        .await
        .unwrap_err();
    let err = err
        .downcast_ref::<NoBackendError>()
        .expect("NoBackendError");
    assert!(err.retry_after.unwrap() > Duration::from_secs(8));
}

#[tokio::test(start_paused = true)]
async fn a_403_block_isolates_the_whole_resource_and_reports_it() {
    let net = Net::new(|host, _| match host {
        "shared.example" => status(
            403,
            &[("apim-request-id", "req-42"), ("x-ms-region", "East US 2")],
            BLOCKED,
        ),
        _ => ok(0),
    });
    let policy = no_hedge();
    let list = vec![
        Backend::new("east-4o", "https://shared.example")
            .with_deployment("gpt-4o")
            .with_api_key("k1"),
        Backend::new("east-mini", "https://shared.example")
            .with_deployment("mini")
            .with_api_key("k2"),
        backend("west", 1),
    ];
    let routed = layer(list, policy.clone());
    let svc = tower::ServiceBuilder::new()
        .layer(routed)
        .service(client(net.clone()));
    for _ in 0..20 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(served_by(&res), "west.example");
    }
    assert_eq!(
        net.hits("shared.example"),
        1,
        "no second request reaches a blocked resource"
    );

    // With no other resource, the caller gets the support record.
    let net = Net::new(|_, _| {
        status(
            403,
            &[("apim-request-id", "req-42"), ("x-ms-region", "East US 2")],
            BLOCKED,
        )
    });
    let only = vec![
        Backend::new("east-4o", "https://shared.example")
            .with_deployment("gpt-4o")
            .with_api_key("SECRET"),
        Backend::new("east-mini", "https://shared.example")
            .with_deployment("mini")
            .with_api_key("SECRET"),
    ];
    let svc = tower::ServiceBuilder::new()
        .layer(layer(only, policy))
        .service(client(net.clone()));
    for _ in 0..3 {
        let err = svc.clone().oneshot(request(None)).await.unwrap_err();
        let blocked = err.downcast_ref::<BlockedError>().expect("BlockedError");
        let text = blocked.support_record();
        for needle in [
            "req-42",
            "East US 2",
            "shared.example",
            "deployment:",
            "HTTP 403",
            "temporarily blocked",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        assert!(!text.contains("SECRET"));
    }
    assert_eq!(net.hits("shared.example"), 1);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_recovers_through_a_half_open_probe() {
    let net = Net::new(|host, _| match host {
        "a.example" => status(500, &[], "{}"),
        _ => ok(0),
    });
    let layer = layer(vec![backend("a", 0), backend("b", 1)], no_hedge());
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(client(net.clone()));
    for _ in 0..10 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(served_by(&res), "b.example", "a 5xx fails over");
    }
    assert_eq!(
        net.hits("a.example"),
        5,
        "the breaker opened after 5 failures"
    );
    let a = layer.inspect(|r| r.backends().find("a").unwrap());
    assert!(matches!(
        layer.inspect(|r| r.breaker(a)),
        BreakerState::Open { .. }
    ));
    net.set(|_, _| ok(0));
    tokio::time::advance(Duration::from_secs(30)).await;
    let res = svc.clone().oneshot(request(None)).await.unwrap();
    assert_eq!(served_by(&res), "a.example", "the probe");
    assert_eq!(layer.inspect(|r| r.breaker(a)), BreakerState::Closed);
    for _ in 0..5 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(served_by(&res), "a.example");
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_is_hedged_and_the_loser_is_dropped() {
    let slow = Arc::new(AtomicBool::new(false));
    let s = slow.clone();
    let net = Net::new(move |host, _| match host {
        "a.example" if s.load(Ordering::SeqCst) => ok(10_000),
        "a.example" => ok(100),
        _ => ok(50),
    });
    let layer = layer(
        vec![backend("a", 0), backend("b", 1)],
        RoutePolicy::default(),
    );
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(client(net.clone()));
    for _ in 0..40 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(served_by(&res), "a.example");
    }
    assert_eq!(layer.stats().hedges, 0, "no call was slower than p95");
    slow.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let res = svc.clone().oneshot(request(None)).await.unwrap();
    let took = Instant::now() - t0;
    assert_eq!(served_by(&res), "b.example", "the hedge won");
    assert!(took < Duration::from_millis(300), "{took:?}");
    assert_eq!(layer.stats().hedges, 1);
    let flags = net.dropped.lock().unwrap().clone();
    let loser = &flags[flags.len() - 2];
    assert!(loser.load(Ordering::SeqCst), "the slow attempt was dropped");
    let a = layer.inspect(|r| r.backends().find("a").unwrap());
    assert_eq!(
        layer.inspect(|r| r.in_flight(a)),
        0,
        "its in-flight count was released"
    );
    assert_eq!(layer.stats().cancelled, 1);
}

#[tokio::test(start_paused = true)]
async fn hedging_stays_within_its_budget() {
    let net = Net::new(|host, n| match host {
        // Every 5th call to a is slow.
        "a.example" if n % 5 == 4 && n > 40 => ok(5_000),
        "a.example" => ok(100),
        _ => ok(50),
    });
    let layer = layer(
        vec![backend("a", 0), backend("b", 1)],
        RoutePolicy::default(),
    );
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(client(net.clone()));
    for _ in 0..400 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let stats = layer.stats();
    assert!(stats.hedges > 0);
    assert!(
        stats.hedges as f64 <= 0.05 * stats.calls as f64 + 1.0,
        "{stats:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_hedge_does_not_win_over_a_slower_success() {
    let slow = Arc::new(AtomicBool::new(false));
    let s = slow.clone();
    let net = Net::new(move |host, _| match host {
        "a.example" if s.load(Ordering::SeqCst) => ok(1_000),
        "a.example" => ok(100),
        _ => status(500, &[], "{}"),
    });
    let layer = layer(
        vec![backend("a", 0), backend("b", 1)],
        RoutePolicy::default(),
    );
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(client(net.clone()));
    for _ in 0..40 {
        svc.clone().oneshot(request(None)).await.unwrap();
    }
    slow.store(true, Ordering::SeqCst);
    let res = svc.clone().oneshot(request(None)).await.unwrap();
    assert_eq!(layer.stats().hedges, 1);
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(served_by(&res), "a.example");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_cancels_its_attempts() {
    let net = Net::new(|_, _| ok(10_000));
    let layer = layer(vec![backend("a", 0)], no_hedge());
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(client(net.clone()));
    let fut = svc.clone().oneshot(request(None));
    let res: Result<Result<_, BoxError>, _> =
        tokio::time::timeout(Duration::from_millis(10), fut).await;
    assert!(res.is_err());
    let a = layer.inspect(|r| r.backends().find("a").unwrap());
    assert_eq!(layer.inspect(|r| r.in_flight(a)), 0);
    assert!(net.dropped.lock().unwrap()[0].load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn v1_bodies_get_the_backends_model() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let client = service_fn(move |req: Request<Full<Bytes>>| {
        let s = s.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            s.lock().unwrap().push(body);
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    });
    let layer = layer(
        vec![backend("a", 0).with_deployment("gpt-4o-eu")],
        no_hedge(),
    );
    let svc = tower::ServiceBuilder::new().layer(layer).service(client);
    let req = Request::post("https://x.example/openai/v1/chat/completions")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[]}"#,
        )))
        .unwrap();
    svc.oneshot(req).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&seen.lock().unwrap()[0]).unwrap();
    assert_eq!(body["model"], "gpt-4o-eu");
}

#[tokio::test(start_paused = true)]
async fn a_limiter_refusal_fails_over_without_feeding_the_breaker() {
    let client = service_fn(|req: Request<Full<Bytes>>| async move {
        if req.uri().host() == Some("a.example") {
            return Err::<Response<Full<Bytes>>, BoxError>(Box::new(crate::limit::Overloaded {
                reason: crate::limit::OverloadReason::QueueFull,
            }));
        }
        Ok(Response::builder()
            .header("x-served-by", "b.example")
            .body(Full::new(Bytes::new()))
            .unwrap())
    });
    let layer = layer(vec![backend("a", 0), backend("b", 1)], no_hedge());
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(client);
    for _ in 0..10 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(served_by(&res), "b.example");
    }
    let a = layer.inspect(|r| r.backends().find("a").unwrap());
    assert_eq!(layer.inspect(|r| r.breaker(a)), BreakerState::Closed);
    assert_eq!(layer.inspect(|r| r.in_flight(a)), 0);
}

/// Serves on a loopback port: every request's `api-key` is recorded, the answer is `status`
/// (a 429 carries a one-minute hint).
async fn serve(status: u16) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let key = req
                        .headers()
                        .get("api-key")
                        .map(|v| v.to_str().unwrap_or("?").to_owned())
                        .unwrap_or_default();
                    record.lock().unwrap().push(key);
                    async move {
                        let mut b = Response::builder().status(status);
                        if status == 429 {
                            b = b.header("retry-after-ms", "60000");
                        }
                        Ok::<_, Infallible>(
                            b.body(Full::new(Bytes::from_static(b"{\"ok\":1}")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn over_real_http_a_throttled_endpoint_fails_over_and_keys_stay_home() {
    let (a, seen_a) = serve(429).await;
    let (b, seen_b) = serve(200).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let backends = vec![
        Backend::new("a", format!("http://{a}")).with_api_key("KEY-A"),
        Backend::new("b", format!("http://{b}")).with_api_key("KEY-B"),
    ];
    let svc = tower::ServiceBuilder::new()
        .layer(layer(backends, no_hedge()))
        .service(client);
    for _ in 0..5 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"ok\":1}");
    }
    let seen_a = seen_a.lock().unwrap().clone();
    let seen_b = seen_b.lock().unwrap().clone();
    assert!(seen_a.len() <= 1, "a cooled down after its 429: {seen_a:?}");
    assert!(seen_a.iter().all(|k| k == "KEY-A"), "{seen_a:?}");
    assert_eq!(seen_b, vec!["KEY-B"; 5]);
}

#[tokio::test]
async fn the_full_stack_runs_over_a_hyper_client() {
    let (a, seen_a) = serve(200).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let stack = crate::stack::Stack::builder()
        .backend(Backend::new("a", format!("http://{a}")).with_api_key("KEY-A"))
        .seed(2)
        .build(client)
        .unwrap();
    for _ in 0..3 {
        let res = stack.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"ok\":1}");
    }
    assert_eq!(*seen_a.lock().unwrap(), vec!["KEY-A"; 3]);
    assert_eq!(
        stack.stats().backend("a").unwrap().gauges.in_flight,
        0,
        "bodies ended: permits back"
    );
}

/// A response body played from a script: data chunks, or a transport error (a reset stream).
struct Frames(std::collections::VecDeque<Result<&'static str, &'static str>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|f| match f {
            Ok(data) => Ok(http_body::Frame::data(Bytes::from_static(data.as_bytes()))),
            Err(e) => Err(e.into()),
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// A client whose 200 streams from `a.example` break after their first chunk while `broken` is
/// set (and are read to their end otherwise); every other host's streams end. Records each host.
fn streaming(
    hits: Arc<Mutex<Vec<String>>>,
    broken: Arc<AtomicBool>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Frames>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ Sync
+ 'static {
    service_fn(move |req: Request<Full<Bytes>>| {
        let host = req.uri().host().unwrap_or_default().to_owned();
        hits.lock().unwrap().push(host.clone());
        let frames = if host == "a.example" && broken.load(Ordering::SeqCst) {
            vec![
                Ok("data: 1\n\n"),
                Err("connection reset"),
                Err("connection reset"),
            ]
        } else {
            vec![Ok("data: 1\n\n"), Ok("data: [DONE]\n\n")]
        };
        let res = Response::builder()
            .header("x-served-by", host)
            .body(Frames(frames.into()))
            .unwrap();
        async move { Ok::<_, Infallible>(res) }
    })
}

/// Reads a body to its end: its data, and how many errors it yielded on the way.
async fn drain<B>(mut body: B) -> (Vec<u8>, usize)
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let (mut data, mut errors) = (Vec::new(), 0);
    while let Some(frame) = body.frame().await {
        match frame.map(|f| f.into_data()) {
            Ok(Ok(chunk)) => data.extend_from_slice(&chunk),
            Ok(Err(_trailers)) => {}
            Err(_) => errors += 1,
        }
    }
    (data, errors)
}

/// The layers composed by hand, as the crate docs show them: retry over the route over a limiter
/// per backend. Returns the route too, for its stats.
fn composed(
    layer: &RouteLayer,
    client: impl Service<
        Request<Full<Bytes>>,
        Response = Response<Frames>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static,
) -> (
    impl Service<
        Request<Full<Bytes>>,
        Response = Response<impl http_body::Body<Data = Bytes, Error = BoxError> + Unpin>,
        Error = BoxError,
    > + Clone,
    super::Route<impl Sized>,
) {
    use tower::Layer;
    let n = layer.inspect(|r| r.backends().len());
    let limited = (0..n)
        .map(|_| crate::AdaptiveConcurrencyLayer::default().layer(client.clone()))
        .collect();
    let route = layer.layer_each(limited);
    (crate::RetryLayer::default().layer(route.clone()), route)
}

fn count(hits: &Mutex<Vec<String>>, host: &str) -> usize {
    hits.lock().unwrap().iter().filter(|h| *h == host).count()
}

#[tokio::test(start_paused = true)]
async fn a_backend_whose_streams_break_is_passed_over_by_its_breaker() {
    let hits = Arc::new(Mutex::new(Vec::new()));
    let broken = Arc::new(AtomicBool::new(true));
    let layer = layer(vec![backend("a", 0), backend("b", 1)], no_hedge());
    let (svc, route) = composed(&layer, streaming(hits.clone(), broken));
    let a = layer.inspect(|r| r.backends().find("a").unwrap());
    // Default breaker: open at >= 50 % failures among >= 5 results. Each broken stream is a
    // success on its headers and a failure on its body, so the third one opens it (3 of 6).
    for i in 0..3 {
        assert_eq!(layer.inspect(|r| r.breaker(a)), BreakerState::Closed, "{i}");
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(served_by(&res), "a.example");
        let (data, errors) = drain(res.into_body()).await;
        assert_eq!(&data[..], b"data: 1\n\n");
        assert_eq!(errors, 2, "the reset reaches the caller");
    }
    assert!(
        matches!(layer.inspect(|r| r.breaker(a)), BreakerState::Open { .. }),
        "each broken stream was reported once: {:?}",
        layer.inspect(|r| r.breaker(a))
    );
    for _ in 0..5 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(served_by(&res), "b.example");
        let (data, errors) = drain(res.into_body()).await;
        assert_eq!(
            (&data[..], errors),
            (&b"data: 1\n\ndata: [DONE]\n\n"[..], 0)
        );
    }
    assert_eq!(
        (count(&hits, "a.example"), count(&hits, "b.example")),
        (3, 5)
    );
    let stats = route.stats();
    assert_eq!(
        (stats.calls, stats.attempts, stats.cancelled),
        (8, 8, 0),
        "nothing more was sent to a, not even to fail over"
    );
    assert_eq!(layer.inspect(|r| r.in_flight(a)), 0);
}

#[tokio::test(start_paused = true)]
async fn streams_read_to_their_end_or_dropped_leave_the_breaker_closed() {
    let hits = Arc::new(Mutex::new(Vec::new()));
    let broken = Arc::new(AtomicBool::new(false));
    let layer = layer(vec![backend("a", 0), backend("b", 1)], no_hedge());
    let (svc, route) = composed(&layer, streaming(hits.clone(), broken.clone()));
    let a = layer.inspect(|r| r.backends().find("a").unwrap());
    // Three of each, in a row, each three alone in the breaker's 60 s window: three failures in
    // a row would open it (3 of 6).
    for _ in 0..3 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(served_by(&res), "a.example");
        drop(res); // unread
    }
    assert_eq!(layer.inspect(|r| r.breaker(a)), BreakerState::Closed);
    tokio::time::advance(Duration::from_secs(61)).await;
    for _ in 0..3 {
        // The caller stops reading after the first chunk.
        let mut body = svc
            .clone()
            .oneshot(request(None))
            .await
            .unwrap()
            .into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"data: 1\n\n");
        drop(body);
    }
    assert_eq!(layer.inspect(|r| r.breaker(a)), BreakerState::Closed);
    tokio::time::advance(Duration::from_secs(61)).await;
    for _ in 0..3 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        let (data, errors) = drain(res.into_body()).await;
        assert_eq!(
            (&data[..], errors),
            (&b"data: 1\n\ndata: [DONE]\n\n"[..], 0)
        );
    }
    assert_eq!(layer.inspect(|r| r.breaker(a)), BreakerState::Closed);
    let res = svc.clone().oneshot(request(None)).await.unwrap();
    assert_eq!(served_by(&res), "a.example");
    drop(res);
    assert_eq!(count(&hits, "a.example"), 10);
    assert_eq!(count(&hits, "b.example"), 0);
    assert_eq!((route.stats().calls, route.stats().attempts), (10, 10));

    // The same number of broken streams, in a window of their own, does open it: the route
    // reports breaks, and only breaks.
    tokio::time::advance(Duration::from_secs(61)).await;
    broken.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let res = svc.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(served_by(&res), "a.example");
        assert_eq!(drain(res.into_body()).await.1, 2);
    }
    assert!(matches!(
        layer.inspect(|r| r.breaker(a)),
        BreakerState::Open { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn only_a_successs_body_is_watched() {
    let client = service_fn(|req: Request<Full<Bytes>>| async move {
        let status = if req.uri().host() == Some("a.example") {
            400
        } else {
            200
        };
        Ok::<_, Infallible>(
            Response::builder()
                .status(status)
                .header("x-served-by", req.uri().host().unwrap_or_default())
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
    });
    for (name, watched) in [("a", false), ("b", true)] {
        let svc = tower::ServiceBuilder::new()
            .layer(layer(vec![backend(name, 0)], no_hedge()))
            .service(client);
        let res = svc.oneshot(request(None)).await.unwrap();
        assert_eq!(res.body().is_watched(), watched, "{name}");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{}", "{name}: the body is handed up whole");
    }
}
