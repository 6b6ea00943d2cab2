//! What the layers add per request: a bare hyper client against the same client under
//! tower-aoai's layers, in one run, on loopback, against a hyper server that answers at once.
//!
//! Every round runs every variant once, in an order that rotates from round to round (round `r`
//! starts with variant `r % n`, as `bench/overhead.py` does), and a variant's added time and
//! overhead are the medians of its per-round differences and ratios to the bare client's figure
//! of the same round (paired: a slow stretch of the machine hits both sides of a pair alike),
//! with the 25th and 75th percentiles of the paired ratio as its spread.

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
use tower::limit::ConcurrencyLimit;
use tower::retry::{Policy, Retry};
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
    /// Rounds; each round runs every variant once, in a rotating order, and the medians over
    /// the rounds count (the overhead paired with the bare client's figure of the same round).
    pub rounds: usize,
    /// Concurrent callers.
    pub concurrency: usize,
    /// Run only the variants whose name contains this (the bare client always runs).
    pub only: Option<&'static str>,
}

pub(crate) const BODY: &[u8] =
    br#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":16}"#;
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
pub(crate) async fn drain<B>(res: Response<B>) -> Result<(), BoxError>
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

pub(crate) fn client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// The name of the calibration variant: tower's own retry over tower's own concurrency limit.
const TOWER_STOCK: &str = "tower stock: Retry + ConcurrencyLimit";

/// The permits of the calibration variant's `ConcurrencyLimit` (more than any caller count the
/// bench uses by default, so it never waits, but pays for the semaphore).
const TOWER_STOCK_LIMIT: usize = 64;

/// The calibration variant's retry policy: the least a retrying tower stack does per request
/// (copy the request before sending it, look at the answer), retrying a 429 or a 5xx at most
/// `remaining` more times and at once (the zero-latency server never fails, so it never waits).
#[derive(Debug, Clone, Copy)]
struct StockPolicy {
    remaining: u8,
}

impl Default for StockPolicy {
    fn default() -> Self {
        Self { remaining: 2 }
    }
}

impl<B, E> Policy<Request<Full<Bytes>>, Response<B>, E> for StockPolicy {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<B>, E>,
    ) -> Option<Self::Future> {
        let status = result.as_ref().ok()?.status();
        let retryable = status == http::StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
        if !retryable || self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        Some(std::future::ready(()))
    }

    fn clone_request(&mut self, req: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        let mut copy = Request::new(req.body().clone());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        Some(copy)
    }
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
    let stock = Retry::new(
        StockPolicy::default(),
        ConcurrencyLimit::new(client(), TOWER_STOCK_LIMIT),
    )
    .map_err(BoxError::from)
    .and_then(drain::<Incoming>);
    Ok(vec![
        ("bare hyper client", BoxCloneSyncService::new(bare)),
        ("RetryLayer", BoxCloneSyncService::new(retry)),
        (TOWER_STOCK, BoxCloneSyncService::new(stock)),
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
pub(crate) fn thread_cpu() -> Option<Duration> {
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

/// Runs every variant `rounds` times, interleaved in a rotating order, and reports the median
/// time per request and the paired overhead (median and quartiles) against the bare client.
pub fn run(options: Options) -> Result<Value, BoxError> {
    with_zero_server(|client_rt, addr| client_rt.block_on(measure(addr, options)))
}

/// Runs `client` with the zero-latency server listening at the address it is given. The client
/// runs on this thread (a current-thread runtime: its CPU time is the client's alone); the server
/// runs on a runtime of its own on another thread.
pub(crate) fn with_zero_server<T>(
    client: impl FnOnce(&tokio::runtime::Runtime, SocketAddr) -> Result<T, BoxError>,
) -> Result<T, BoxError> {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let addr = server_rt.block_on(serve())?;
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = client(&client_rt, addr);
    drop(client_rt);
    server_rt.shutdown_background();
    result
}

/// Which of `names` run under `--only`: the first (the bare client) always; then the one named
/// exactly `only` if there is one, else every one whose name contains it.
fn selected(names: &[&str], only: Option<&str>) -> Vec<usize> {
    let Some(only) = only else {
        return (0..names.len()).collect();
    };
    let exact = names.contains(&only);
    (0..names.len())
        .filter(|&i| {
            i == 0
                || (if exact {
                    names[i] == only
                } else {
                    names[i].contains(only)
                })
        })
        .collect()
}

/// The order the `n` variants run in round `round`: each starts a round in turn (round `r` with
/// variant `r % n`), so none always runs right after the same one and inherits the state the
/// previous one left (as `rotation` in `bench/overhead.py`).
fn rotation(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (round + i) % n)
}

/// The `q` quantile (`0.0..=1.0`) of `xs`, interpolating linearly between the two closest ranks
/// (so `q = 0.5` is the usual median; as `quantile` in `bench/overhead.py`); `None` if empty.
fn quantile(xs: &[f64], q: f64) -> Option<f64> {
    let mut sorted = xs.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let last = sorted.len().checked_sub(1)?;
    let pos = q.clamp(0.0, 1.0) * last as f64;
    // `pos` lies in 0..=last, so both ranks are in bounds.
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let (a, b) = (sorted[lo], sorted[hi]);
    Some(a + (b - a) * (pos - lo as f64))
}

/// A variant against the bare client, paired round by round.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Paired {
    /// Median of the per-round differences (seconds).
    added: f64,
    /// Median of the per-round ratios, less one.
    ratio: f64,
    /// 25th percentile of the per-round ratios, less one.
    ratio_q1: f64,
    /// 75th percentile of the per-round ratios, less one.
    ratio_q3: f64,
}

/// Pairs a variant's per-round figures with the bare client's of the same rounds (a round where
/// either side has no figure is left out); `None` if no round pairs.
fn paired(variant: &[Option<f64>], bare: &[Option<f64>]) -> Option<Paired> {
    let pairs: Vec<(f64, f64)> = variant
        .iter()
        .zip(bare)
        .filter_map(|(v, b)| Some(((*v)?, (*b)?)))
        .collect();
    let diffs: Vec<f64> = pairs.iter().map(|(v, b)| v - b).collect();
    let ratios: Vec<f64> = pairs.iter().map(|(v, b)| v / b - 1.0).collect();
    Some(Paired {
        added: quantile(&diffs, 0.5)?,
        ratio: quantile(&ratios, 0.5)?,
        ratio_q1: quantile(&ratios, 0.25)?,
        ratio_q3: quantile(&ratios, 0.75)?,
    })
}

/// The JSON row of variant `name` from its per-round figures and the bare client's (seconds per
/// request; `None` where the CPU time is unknown).
fn row(
    name: &str,
    (wall, cpu): (&[Option<f64>], &[Option<f64>]),
    (bare_wall, bare_cpu): (&[Option<f64>], &[Option<f64>]),
) -> Value {
    let median =
        |xs: &[Option<f64>]| quantile(&xs.iter().flatten().copied().collect::<Vec<_>>(), 0.5);
    let mut row = json!({ "variant": name });
    let Some(fields) = row.as_object_mut() else {
        return row;
    };
    if let (Some(per), Some(p)) = (median(wall), paired(wall, bare_wall)) {
        fields.extend([
            ("us_per_request".into(), json!(per * 1e6)),
            ("requests_per_s".into(), json!(1.0 / per)),
            ("added_us".into(), json!(p.added * 1e6)),
            ("overhead_ratio".into(), json!(p.ratio)),
            ("overhead_ratio_q1".into(), json!(p.ratio_q1)),
            ("overhead_ratio_q3".into(), json!(p.ratio_q3)),
        ]);
    }
    if let (Some(per), Some(p)) = (median(cpu), paired(cpu, bare_cpu)) {
        fields.extend([
            ("cpu_us_per_request".into(), json!(per * 1e6)),
            ("cpu_added_us".into(), json!(p.added * 1e6)),
            ("cpu_overhead_ratio".into(), json!(p.ratio)),
            ("cpu_overhead_ratio_q1".into(), json!(p.ratio_q1)),
            ("cpu_overhead_ratio_q3".into(), json!(p.ratio_q3)),
        ]);
    }
    row
}

async fn measure(addr: SocketAddr, options: Options) -> Result<Value, BoxError> {
    let base = format!("http://{addr}");
    let url = format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let all = variants(&base)?;
    let names: Vec<&str> = all.iter().map(|(name, _)| *name).collect();
    let keep = selected(&names, options.only);
    let variants: Vec<(&str, Svc)> = all
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, v)| v)
        .collect();
    // Warm-up: connections open, limits grown out of slow start, caches warm.
    for (_, svc) in &variants {
        round(svc, &url, options.requests.min(2000), options.concurrency).await?;
    }
    let rounds = options.rounds.max(1);
    let mut walls = vec![vec![None; rounds]; variants.len()];
    let mut cpus = vec![vec![None; rounds]; variants.len()];
    for r in 0..rounds {
        for i in rotation(variants.len(), r) {
            let (wall, cpu) =
                round(&variants[i].1, &url, options.requests, options.concurrency).await?;
            walls[i][r] = Some(wall.as_secs_f64());
            cpus[i][r] = cpu.map(|c| c.as_secs_f64());
        }
    }
    let rows: Vec<Value> = variants
        .iter()
        .enumerate()
        .map(|(i, (name, _))| row(name, (&walls[i], &cpus[i]), (&walls[0], &cpus[0])))
        .collect();
    Ok(json!({
        "concurrency": options.concurrency,
        "requests": options.requests,
        "rounds": options.rounds,
        "order": "rotating",
        "rows": rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_starts_each_round_with_the_next_variant() {
        let orders: Vec<Vec<usize>> = (0..4).map(|r| rotation(3, r).collect()).collect();
        assert_eq!(
            orders,
            [vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1], vec![0, 1, 2]]
        );
        // One round: the bare client (variant 0) runs first, as bench/instructions.py counts on.
        assert_eq!(rotation(2, 0).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(rotation(1, 7).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn quantile_interpolates_between_ranks() {
        let xs = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(&xs, 0.5), Some(2.5));
        assert_eq!(quantile(&xs, 0.25), Some(1.75));
        assert_eq!(quantile(&xs, 0.75), Some(3.25));
        assert_eq!(quantile(&xs, 0.0), Some(1.0));
        assert_eq!(quantile(&xs, 1.0), Some(4.0));
        assert_eq!(quantile(&[5.0, 1.0, 3.0], 0.5), Some(3.0));
        assert_eq!(quantile(&[7.0], 0.25), Some(7.0));
        assert_eq!(quantile(&[], 0.5), None);
        // Out-of-range q clamps instead of indexing out of bounds.
        assert_eq!(quantile(&xs, 2.0), Some(4.0));
        assert_eq!(quantile(&xs, -1.0), Some(1.0));
    }

    #[test]
    fn paired_ratio_ignores_load_that_hits_both_sides_of_a_round() {
        // The machine is twice and three times as slow in rounds 2 and 3; the variant always
        // costs 5 % more than the bare client of the same round.
        let bare = [Some(10.0), Some(20.0), Some(30.0)];
        let variant = [Some(10.5), Some(21.0), Some(31.5)];
        let p = paired(&variant, &bare).unwrap();
        assert!((p.ratio - 0.05).abs() < 1e-12, "{p:?}");
        assert!((p.ratio_q1 - 0.05).abs() < 1e-12, "{p:?}");
        assert!((p.ratio_q3 - 0.05).abs() < 1e-12, "{p:?}");
        assert!((p.added - 1.0).abs() < 1e-12, "{p:?}");
        // One noisy round (45 against 30) moves the upper quartile, not the median.
        let variant = [Some(10.5), Some(21.0), Some(45.0)];
        let p = paired(&variant, &bare).unwrap();
        assert!((p.ratio - 0.05).abs() < 1e-12, "{p:?}");
        assert!((p.ratio_q1 - 0.05).abs() < 1e-12, "{p:?}");
        assert!((p.ratio_q3 - 0.275).abs() < 1e-12, "{p:?}");
    }

    #[test]
    fn paired_skips_rounds_without_a_figure_on_either_side() {
        let bare = [Some(1.0), None, Some(2.0), Some(4.0)];
        let variant = [Some(2.0), Some(100.0), None, Some(6.0)];
        let p = paired(&variant, &bare).unwrap();
        // Rounds 0 and 3 pair: ratios 1.0 and 0.5, differences 1.0 and 2.0.
        assert!((p.ratio - 0.75).abs() < 1e-12, "{p:?}");
        assert!((p.added - 1.5).abs() < 1e-12, "{p:?}");
        assert_eq!(paired(&[None, Some(1.0)], &[Some(1.0), None]), None);
    }

    #[test]
    fn row_carries_the_medians_and_the_spread() {
        let bare_wall = [Some(10e-6), Some(20e-6), Some(30e-6)];
        let wall = [Some(11e-6), Some(21e-6), Some(33e-6)];
        let none = [None, None, None];
        let r = row("v", (&wall, &none), (&bare_wall, &none));
        let f = |k: &str| r[k].as_f64().unwrap();
        assert_eq!(r["variant"], "v");
        assert!((f("us_per_request") - 21.0).abs() < 1e-9);
        assert!((f("added_us") - 1.0).abs() < 1e-9);
        // Ratios 0.1, 0.05, 0.1.
        assert!((f("overhead_ratio") - 0.1).abs() < 1e-9);
        assert!((f("overhead_ratio_q1") - 0.075).abs() < 1e-9);
        assert!((f("overhead_ratio_q3") - 0.1).abs() < 1e-9);
        assert!(
            r.get("cpu_overhead_ratio").is_none(),
            "no CPU figures, no CPU fields"
        );
        let bare = row("bare", (&bare_wall, &bare_wall), (&bare_wall, &bare_wall));
        assert_eq!(bare["overhead_ratio"].as_f64(), Some(0.0));
        assert_eq!(bare["cpu_overhead_ratio_q3"].as_f64(), Some(0.0));
    }

    #[test]
    fn stock_policy_retries_a_429_or_5xx_at_most_twice() {
        let req = || {
            Request::post("http://127.0.0.1:9/x?y=1")
                .header("api-key", "k")
                .body(Full::new(Bytes::from_static(BODY)))
                .unwrap()
        };
        let answer =
            |status: u16| Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap());
        let mut policy = StockPolicy::default();
        let mut r = req();
        assert!(policy.retry(&mut r, &mut answer(429)).is_some());
        assert!(policy.retry(&mut r, &mut answer(503)).is_some());
        assert!(
            policy.retry(&mut r, &mut answer(500)).is_none(),
            "a third retry"
        );
        let mut policy = StockPolicy::default();
        assert!(policy.retry(&mut r, &mut answer(200)).is_none());
        assert!(policy.retry(&mut r, &mut answer(400)).is_none());
        let mut failed: Result<Response<()>, &str> = Err("connect");
        assert!(policy.retry(&mut r, &mut failed).is_none());
    }

    #[tokio::test]
    async fn stock_policy_copies_the_whole_request() {
        let mut original = Request::put("http://127.0.0.1:9/openai?api-version=1")
            .header("api-key", "k")
            .header("content-type", "application/json")
            .version(http::Version::HTTP_11)
            .body(Full::new(Bytes::from_static(BODY)))
            .unwrap();
        let copy =
            Policy::<_, Response<()>, ()>::clone_request(&mut StockPolicy::default(), &original)
                .unwrap();
        assert_eq!(copy.method(), original.method());
        assert_eq!(copy.uri(), original.uri());
        assert_eq!(copy.version(), original.version());
        assert_eq!(copy.headers(), original.headers());
        let body = copy.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], BODY);
        let body = original.body_mut().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], BODY, "the original keeps its body");
    }

    #[tokio::test]
    async fn only_selects_by_exact_name_then_by_substring() {
        let all = variants("http://127.0.0.1:9").unwrap();
        let names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
        let pick = |only: Option<&str>| -> Vec<&str> {
            selected(&names, only).iter().map(|&i| names[i]).collect()
        };
        assert_eq!(names[0], "bare hyper client");
        assert_eq!(pick(None), names);
        assert_eq!(pick(Some("Stack")), ["bare hyper client", "Stack"]);
        assert_eq!(pick(Some(TOWER_STOCK)), ["bare hyper client", TOWER_STOCK]);
        assert_eq!(pick(Some("tower")), ["bare hyper client", TOWER_STOCK]);
        assert_eq!(
            pick(Some("RetryLayer")),
            ["bare hyper client", "RetryLayer"]
        );
        assert_eq!(
            pick(Some("hedging")),
            ["bare hyper client", "layers composed, hedging off"]
        );
        assert_eq!(pick(Some("nothing like it")), ["bare hyper client"]);
    }

    #[test]
    fn a_short_run_pairs_every_variant_with_the_bare_client() {
        let options = Options {
            requests: 20,
            rounds: 3,
            concurrency: 2,
            only: Some("tower"),
        };
        let out = run(options).unwrap();
        let rows = out["rows"].as_array().unwrap();
        let names: Vec<&str> = rows
            .iter()
            .map(|r| r["variant"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["bare hyper client", TOWER_STOCK]);
        assert_eq!(rows[0]["overhead_ratio"].as_f64(), Some(0.0));
        assert_eq!(rows[0]["added_us"].as_f64(), Some(0.0));
        for r in rows {
            let f = |k: &str| r[k].as_f64().unwrap();
            assert!(f("us_per_request") > 0.0, "{r}");
            assert!(f("overhead_ratio_q1") <= f("overhead_ratio"), "{r}");
            assert!(f("overhead_ratio") <= f("overhead_ratio_q3"), "{r}");
            if r.get("cpu_overhead_ratio").is_some() {
                assert!(
                    f("cpu_overhead_ratio_q1") <= f("cpu_overhead_ratio_q3"),
                    "{r}"
                );
            }
        }
    }
}
