//! What the layers add per request: a bare hyper client against the same client under
//! tower-aoai's layers, in one run, on loopback, against a hyper server that answers at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, ServiceExt};
use tower_aoai::policy::RetryPolicy;
use tower_aoai::policy::route::{Backend, Backends, HedgePolicy, RoutePolicy};
use tower_aoai::stack::Stack;
use tower_aoai::{AdaptiveConcurrencyLayer, RetryLayer, RouteLayer};

/// How the overhead run is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Requests per variant per round.
    pub requests: usize,
    /// Rounds; each round runs every variant once, in turn, and the median round counts.
    pub rounds: usize,
    /// Concurrent callers.
    pub concurrency: usize,
    /// Run only the variants whose name contains this (the bare client always runs).
    pub only: Option<&'static str>,
}

const BODY: &[u8] = br#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":16}"#;
const ANSWER: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;

/// The headers Azure OpenAI sends with a success (see `shared/AZURE.md`), so that every variant
/// reads a real answer's headers: the client parses them all, and the layers read the rate-limit
/// and region ones.
const AZURE_HEADERS: [(&str, &str); 9] = [
    ("content-type", "application/json"),
    ("apim-request-id", "6d1f0c2e-4b5a-4c2d-9e1f-0a1b2c3d4e5f"),
    ("x-request-id", "8f0e1d2c-3b4a-5968-7a6b-5c4d3e2f1a0b"),
    (
        "x-ms-client-request-id",
        "6d1f0c2e-4b5a-4c2d-9e1f-0a1b2c3d4e5f",
    ),
    ("x-ms-region", "East US 2"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "9999000"),
    ("x-ms-deployment-name", "gpt-4o"),
    (
        "strict-transport-security",
        "max-age=31536000; includeSubDomains; preload",
    ),
];

type Svc = BoxCloneSyncService<Request<Full<Bytes>>, (), BoxError>;

/// Starts the zero-latency server; returns its address.
pub async fn serve() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    let mut res = Response::builder();
                    for (name, value) in AZURE_HEADERS {
                        res = res.header(name, value);
                    }
                    Ok::<_, Infallible>(
                        res.body(Full::new(Bytes::from_static(ANSWER)))
                            .expect("a valid response"),
                    )
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Reads the whole body so every variant does the same work per request.
async fn drain<B>(res: Response<B>) -> Result<(), BoxError>
where
    B: hyper::body::Body,
    B::Error: Into<BoxError>,
{
    let body = res.into_body().collect().await.map_err(Into::into)?;
    if body.to_bytes().len() != ANSWER.len() {
        return Err("short body".into());
    }
    Ok(())
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

fn variants(base: &str) -> Result<Vec<(&'static str, Svc)>, BoxError> {
    let bare = client().map_err(BoxError::from).and_then(drain::<Incoming>);
    let retry = RetryLayer::default()
        .layer(client())
        .and_then(drain::<tower_aoai::retry::RetryBody<Incoming>>);
    let retry_limit = RetryLayer::default()
        .layer(AdaptiveConcurrencyLayer::default().layer(client()))
        .and_then(drain);
    let backend = || {
        Backend::new("loopback", base.to_string())
            .with_deployment("gpt-4o")
            .with_api_key("bench-key")
    };
    let stack = Stack::builder()
        .backend(backend())
        .seed(1)
        .build(client())?
        .and_then(drain);
    let full = {
        let limited = vec![AdaptiveConcurrencyLayer::default().layer(client())];
        let route = RouteLayer::new(Backends::new(vec![backend()])?, RoutePolicy::default());
        RetryLayer::new(RetryPolicy::default())
            .layer(route.layer_each(limited))
            .and_then(drain)
    };
    let full_no_hedge = {
        let limited = vec![AdaptiveConcurrencyLayer::default().layer(client())];
        let policy = RoutePolicy::default().with_hedge(HedgePolicy::disabled());
        let route = RouteLayer::new(Backends::new(vec![backend()])?, policy);
        RetryLayer::new(RetryPolicy::default())
            .layer(route.layer_each(limited))
            .and_then(drain)
    };
    Ok(vec![
        ("bare hyper client", BoxCloneSyncService::new(bare)),
        ("RetryLayer", BoxCloneSyncService::new(retry)),
        (
            "RetryLayer + AdaptiveConcurrencyLayer",
            BoxCloneSyncService::new(retry_limit),
        ),
        ("Stack", BoxCloneSyncService::new(stack)),
        (
            "layers composed (retry, route, limit)",
            BoxCloneSyncService::new(full),
        ),
        (
            "layers composed, hedging off",
            BoxCloneSyncService::new(full_no_hedge),
        ),
    ])
}

/// CPU time of the calling thread (Linux `/proc/thread-self/schedstat`, nanoseconds), if known.
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// One round of one variant: `requests` calls from `concurrency` callers; returns the wall time
/// and the client thread's CPU time per request.
async fn round(
    svc: &Svc,
    url: &str,
    requests: usize,
    concurrency: usize,
) -> Result<(Duration, Option<Duration>), BoxError> {
    let per = requests.div_ceil(concurrency);
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let svc = svc.clone();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                let req = Request::post(url.as_str())
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(BODY)))?;
                svc.clone().oneshot(req).await?;
            }
            Ok::<_, BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let n = u32::try_from(per * concurrency).unwrap_or(u32::MAX);
    let wall = start.elapsed() / n;
    let cpu = match (cpu0, thread_cpu()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) / n),
        _ => None,
    };
    Ok((wall, cpu))
}

/// Runs every variant `rounds` times, interleaved, and reports the median time per request.
///
/// The client runs on this thread (a current-thread runtime: its CPU time is the client's
/// alone); the server runs on a runtime of its own on another thread.
pub fn run(options: Options) -> Result<Value, BoxError> {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let addr = server_rt.block_on(serve())?;
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = client_rt.block_on(measure(addr, options));
    drop(client_rt);
    server_rt.shutdown_background();
    result
}

async fn measure(addr: SocketAddr, options: Options) -> Result<Value, BoxError> {
    let base = format!("http://{addr}");
    let url = format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let mut variants = variants(&base)?;
    if let Some(only) = options.only {
        // A variant named exactly `only` runs alone; else every variant whose name contains it.
        let exact = variants.iter().any(|(name, _)| *name == only);
        let mut i = 0;
        variants.retain(|(name, _)| {
            i += 1;
            i == 1
                || (if exact {
                    *name == only
                } else {
                    name.contains(only)
                })
        });
    }
    // Warm-up: connections open, limits grown out of slow start, caches warm.
    for (_, svc) in &variants {
        round(svc, &url, options.requests.min(2000), options.concurrency).await?;
    }
    let mut walls: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    let mut cpus: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    for _ in 0..options.rounds.max(1) {
        for (i, (_, svc)) in variants.iter().enumerate() {
            let (wall, cpu) = round(svc, &url, options.requests, options.concurrency).await?;
            walls[i].push(wall);
            if let Some(cpu) = cpu {
                cpus[i].push(cpu);
            }
        }
    }
    let median = |t: &mut Vec<Duration>| -> Option<f64> {
        t.sort_unstable();
        t.get(t.len() / 2).map(Duration::as_secs_f64)
    };
    let wall: Vec<f64> = walls.iter_mut().map(|t| median(t).unwrap_or(0.0)).collect();
    let cpu: Vec<Option<f64>> = cpus.iter_mut().map(median).collect();
    let rows: Vec<Value> = variants
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let per = wall[i];
            let cpu_row = match (cpu[i], cpu[0]) {
                (Some(c), Some(c0)) => json!({
                    "cpu_us_per_request": c * 1e6,
                    "cpu_added_us": (c - c0) * 1e6,
                    "cpu_overhead_ratio": c / c0 - 1.0,
                }),
                _ => json!({}),
            };
            let mut row = json!({
                "variant": name,
                "us_per_request": per * 1e6,
                "requests_per_s": 1.0 / per,
                "added_us": (per - wall[0]) * 1e6,
                "overhead_ratio": per / wall[0] - 1.0,
            });
            if let (Some(r), Some(c)) = (row.as_object_mut(), cpu_row.as_object()) {
                r.extend(c.clone());
            }
            row
        })
        .collect();
    Ok(json!({
        "concurrency": options.concurrency,
        "requests": options.requests,
        "rounds": options.rounds,
        "rows": rows,
    }))
}
