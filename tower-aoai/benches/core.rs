//! What the core's decisions cost per call (criterion), and what the layers add per call over an
//! in-memory service (no network: the layers' own CPU cost).
//!
//! `cargo bench -p tower-aoai --bench core`

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};
use tower_aoai::policy::classify::{Outcome, classify_response};
use tower_aoai::policy::engine::{Engine, EngineConfig, Next};
use tower_aoai::policy::hints::{delay_hint, parse_retry_after, parse_retry_after_ms};
use tower_aoai::policy::route::{Backend, Backends, Pick, RoutePolicy, Router};
use tower_aoai::policy::{AdaptiveLimit, LimitConfig, RetryBudget, RetryPolicy, TokenEstimator};
use tower_aoai::stack::Stack;
use tower_aoai::{AdaptiveConcurrencyLayer, RetryLayer, RouteLayer};

const QUOTA_429: &[u8] = br#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."}}"#;
/// The overhead benchmark's request body (issue 7): 64 bytes.
const SMALL_CHAT: &[u8] = br#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":16}"#;
const REQUEST: &[u8] = br#"{"messages":[{"role":"user","content":"Summarise the attached document in three bullet points, please."}],"max_tokens":256}"#;

fn throttle_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("retry-after-ms", HeaderValue::from_static("5800"));
    h.insert("retry-after", HeaderValue::from_static("6"));
    h.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("0"),
    );
    h.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("6s"));
    h.insert(
        "apim-request-id",
        HeaderValue::from_static("6d8f2a1c-0b7e-4f0e-9a55-1f3c2b1e9d77"),
    );
    h.insert("x-ms-region", HeaderValue::from_static("East US 2"));
    h
}

fn success_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("99"),
    );
    h.insert(
        "x-ratelimit-remaining-tokens",
        HeaderValue::from_static("99000"),
    );
    h.insert("x-ms-region", HeaderValue::from_static("East US 2"));
    h
}

fn backend_list(n: usize) -> Vec<Backend> {
    (0..n)
        .map(|i| {
            Backend::new(format!("b{i}"), format!("https://r{i}.openai.example"))
                .with_deployment("gpt-4o")
                .with_api_key("bench-key")
        })
        .collect()
}

fn backends(n: usize) -> Backends {
    Backends::new(backend_list(n)).expect("valid backends")
}

fn decisions(c: &mut Criterion) {
    let wall = SystemTime::now();
    let throttle = throttle_headers();
    let ok = success_headers();

    let mut g = c.benchmark_group("core");
    g.bench_function("classify 429 with body", |b| {
        b.iter(|| {
            classify_response(
                black_box(StatusCode::TOO_MANY_REQUESTS),
                black_box(&throttle),
                Some(black_box(QUOTA_429)),
                wall,
            )
        })
    });
    g.bench_function("classify 200", |b| {
        b.iter(|| classify_response(black_box(StatusCode::OK), black_box(&ok), None, wall))
    });
    g.bench_function("parse hints (delay_hint of a 429's headers)", |b| {
        b.iter(|| delay_hint(black_box(&throttle), wall))
    });
    g.bench_function("parse retry-after-ms + retry-after", |b| {
        b.iter(|| {
            (
                parse_retry_after_ms(black_box(b"5800")),
                parse_retry_after(black_box(b"6.5"), wall),
            )
        })
    });

    let policy = RetryPolicy::default();
    let class_429 = classify_response(
        StatusCode::TOO_MANY_REQUESTS,
        &throttle,
        Some(QUOTA_429),
        wall,
    );
    let mut budget = RetryBudget::default();
    let mut rng = fastrand::Rng::with_seed(7);
    let t0 = Instant::now();
    let mut tick = 0u64;
    g.bench_function("retry decision (start + on_attempt 429)", |b| {
        b.iter(|| {
            tick += 1;
            let now = t0 + Duration::from_micros(tick);
            let mut call = policy.start(now, None, &mut budget);
            policy.on_attempt(&mut call, black_box(&class_429), now, &mut budget, &mut rng)
        })
    });

    let mut engine = Engine::new(
        Some(backends(4)),
        EngineConfig {
            seed: Some(3),
            ..EngineConfig::default()
        },
    )
    .expect("valid engine");
    let mut tick = 0u64;
    g.bench_function(
        "engine start + next + on_response (success, 4 backends)",
        |b| {
            b.iter(|| {
                tick += 1;
                let now = t0 + Duration::from_micros(tick);
                let mut call = engine.start(now, black_box(REQUEST), None);
                match engine.next(&mut call, now) {
                    Next::Send(ticket) => Some(engine.on_response(
                        &mut call,
                        ticket,
                        StatusCode::OK,
                        &ok,
                        None,
                        now,
                        wall,
                    )),
                    _ => None,
                }
            })
        },
    );

    let mut router = Router::new(backends(4), RoutePolicy::default());
    let mut rng = fastrand::Rng::with_seed(5);
    let class_ok = classify_response(StatusCode::OK, &ok, None, wall);
    let room = |_| 4.0;
    let mut tick = 0u64;
    g.bench_function(
        "router pick among 4 backends (+ on_send, on_response)",
        |b| {
            b.iter(|| {
                tick += 1;
                let now = t0 + Duration::from_micros(tick);
                let mut call = router.start(now, None);
                if let Pick::Send(id) = router.pick(&call, now, &room, &mut rng) {
                    router.on_send(&mut call, id, now);
                    router.on_response(id, &class_ok, Duration::from_millis(300), now, &mut rng);
                }
            })
        },
    );

    let mut limit = AdaptiveLimit::new(LimitConfig::default()).expect("valid limit");
    let mut tick = 0u64;
    g.bench_function("limiter acquire + outcome (success)", |b| {
        b.iter(|| {
            tick += 1;
            let now = t0 + Duration::from_micros(tick);
            if let Some(permit) = limit.try_acquire(now, black_box(300)) {
                limit.on_outcome(permit, Outcome::Success, now);
            }
        })
    });

    // A chat request of a system prompt, two turns and a content-parts message: about 1 KiB.
    let chat = serde_json::json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a careful assistant. ".repeat(8)},
            {"role": "user", "content": "Summarise the attached report in three lines.".repeat(4)},
            {"role": "assistant", "content": "Here is the summary you asked for.".repeat(4)},
            {"role": "user", "content": [
                {"type": "text", "text": "And the risks, with \"quotes\" and \u{e9}."},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
            ]}
        ],
        "max_tokens": 512,
        "temperature": 0.2,
        "stream": true
    })
    .to_string();
    let estimator = TokenEstimator::default();
    g.bench_function("token estimate (64-byte chat body)", |b| {
        b.iter(|| estimator.estimate(black_box(SMALL_CHAT)))
    });
    g.bench_function("token estimate (1 KiB chat body)", |b| {
        b.iter(|| estimator.estimate(black_box(chat.as_bytes())))
    });
    g.finish();
}

fn answer() -> Response<Full<Bytes>> {
    Response::builder()
        .header("x-ms-region", "East US 2")
        .body(Full::new(Bytes::from_static(b"{\"ok\":true}")))
        .expect("a valid response")
}

fn request() -> Request<Full<Bytes>> {
    Request::post("https://r0.openai.example/openai/deployments/gpt-4o/chat/completions")
        .header("api-key", "bench-key")
        .body(Full::new(Bytes::from_static(REQUEST)))
        .expect("a valid request")
}

/// Each layer over an in-memory service that answers at once: the layer's own cost per call.
fn layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let inner = service_fn(|_req: Request<Full<Bytes>>| async { Ok::<_, Infallible>(answer()) });
    let mut g = c.benchmark_group("layers (in-memory service, per call incl. body)");
    g.bench_function("bare service", |b| {
        b.iter(|| {
            rt.block_on(async {
                let res = inner.oneshot(request()).await.expect("ok");
                res.into_body().collect().await.expect("body")
            })
        })
    });
    let retry = RetryLayer::default().layer(inner);
    g.bench_function("RetryLayer", |b| {
        b.iter(|| {
            rt.block_on(async {
                let res = retry.clone().oneshot(request()).await.expect("ok");
                res.into_body().collect().await.expect("body")
            })
        })
    });
    let retry_limit = rt.block_on(async {
        RetryLayer::default().layer(AdaptiveConcurrencyLayer::default().layer(inner))
    });
    g.bench_function("RetryLayer + AdaptiveConcurrencyLayer", |b| {
        b.iter(|| {
            rt.block_on(async {
                let res = retry_limit.clone().oneshot(request()).await.expect("ok");
                res.into_body().collect().await.expect("body")
            })
        })
    });
    let full = rt.block_on(async {
        let limited: Vec<_> = (0..4)
            .map(|_| AdaptiveConcurrencyLayer::default().layer(inner))
            .collect();
        let route = RouteLayer::new(backends(4), RoutePolicy::default()).with_seed(1);
        RetryLayer::default().layer(route.layer_each(limited))
    });
    g.bench_function("layers composed (retry + route over 4 + limit each)", |b| {
        b.iter(|| {
            rt.block_on(async {
                let res = full.clone().oneshot(request()).await.expect("ok");
                res.into_body().collect().await.expect("body")
            })
        })
    });
    let stack = rt.block_on(async {
        Stack::builder()
            .backends(backend_list(4))
            .seed(1)
            .build(inner)
            .expect("a valid stack")
    });
    g.bench_function("Stack (over 4 backends)", |b| {
        b.iter(|| {
            rt.block_on(async {
                let res = stack.clone().oneshot(request()).await.expect("ok");
                res.into_body().collect().await.expect("body")
            })
        })
    });
    g.finish();
}

criterion_group!(benches, decisions, layers);
criterion_main!(benches);
