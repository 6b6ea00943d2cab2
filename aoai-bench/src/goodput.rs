//! The Rust contender of the goodput benchmark: tower-aoai's [`Stack`] (retry, route and hedge,
//! an adaptive limiter per backend) over a hyper client, against the simulator's HTTP server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_aoai::policy::route::Backend;
use tower_aoai::stack::Stack;

use crate::schedule::Schedule;

/// How the Rust contender runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// `http://127.0.0.1:PORT` of the simulator (resources at `/r/{resource}`).
    pub server: String,
    /// The simulator's `--time-scale`: arrivals are `at / time_scale` real seconds apart and
    /// latencies are reported in virtual seconds (real times `time_scale`).
    pub time_scale: f64,
    /// The longest one call may take, in real seconds.
    pub call_timeout: Duration,
    /// Seeds the stack's random choices.
    pub seed: u64,
}

/// One call's result.
#[derive(Debug, Clone)]
struct CallResult {
    ok: bool,
    status: u16,
    stream: bool,
    latency_s: f64,
    ttft_s: Option<f64>,
    finish_s: f64,
    error: Option<String>,
}

/// Runs the schedule through the full stack and returns the per-call results as JSON.
pub async fn run(schedule: &Schedule, options: &Options) -> Result<Value, BoxError> {
    let backends: Vec<Backend> = schedule
        .targets
        .iter()
        .map(|t| {
            Backend::new(
                t.name.clone(),
                format!("{}/r/{}", options.server.trim_end_matches('/'), t.resource),
            )
            .with_deployment(t.deployment.clone())
            .with_region(t.region.clone())
            .with_api_key(t.api_key.clone())
            .with_tier(t.tier)
        })
        .collect();
    let hits = Arc::new(AtomicU64::new(0));
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http::<Full<Bytes>>();
    let counted = {
        let hits = hits.clone();
        ServiceBuilder::new()
            .map_request(move |req: Request<Full<Bytes>>| {
                hits.fetch_add(1, Ordering::Relaxed);
                req
            })
            .service(client)
    };
    let stack = Stack::builder()
        .backends(backends)
        .seed(options.seed)
        .build(counted)?;

    let first = &schedule.targets[0];
    let url = format!(
        "{}/r/{}/openai/deployments/{}/chat/completions?api-version=2024-10-21",
        options.server.trim_end_matches('/'),
        first.resource,
        first.deployment
    );
    let plain = Bytes::from(schedule.body.to_string());
    let streaming = {
        let mut b = schedule.body.clone();
        b["stream"] = json!(true);
        Bytes::from(b.to_string())
    };
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(schedule.arrivals.len());
    for arrival in &schedule.arrivals {
        let at = start + arrival.at.div_f64(options.time_scale);
        let body = if arrival.stream {
            streaming.clone()
        } else {
            plain.clone()
        };
        let svc = stack.clone();
        let url = url.clone();
        let stream = arrival.stream;
        let scale = options.time_scale;
        let timeout = options.call_timeout;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let sent = Instant::now();
            let req = Request::post(url)
                .header("content-type", "application/json")
                .header("api-key", "replaced-by-the-router")
                .body(Full::new(body))
                .expect("a valid request");
            let call = async {
                let res = svc.oneshot(req).await?;
                let status = res.status();
                let mut body = res.into_body();
                let mut ttft = None;
                let mut tail: Vec<u8> = Vec::new();
                while let Some(frame) = body.frame().await {
                    let frame = frame?;
                    if let Some(data) = frame.data_ref()
                        && !data.is_empty()
                    {
                        ttft.get_or_insert_with(|| sent.elapsed());
                        tail.extend_from_slice(data);
                        if tail.len() > 64 {
                            tail.drain(..tail.len() - 64);
                        }
                    }
                }
                let complete = !stream || tail.windows(6).any(|w| w == b"[DONE]");
                Ok::<_, BoxError>((status, ttft, complete))
            };
            let outcome = tokio::time::timeout(timeout, call).await;
            let latency_s = sent.elapsed().as_secs_f64() * scale;
            let finish_s = start.elapsed().as_secs_f64() * scale;
            match outcome {
                Ok(Ok((status, ttft, complete))) => CallResult {
                    ok: status == StatusCode::OK && complete,
                    status: status.as_u16(),
                    stream,
                    latency_s,
                    finish_s,
                    ttft_s: ttft.map(|t| t.as_secs_f64() * scale),
                    error: (!complete).then(|| "stream ended early".to_string()),
                },
                Ok(Err(e)) => CallResult {
                    ok: false,
                    status: 0,
                    stream,
                    latency_s,
                    finish_s,
                    ttft_s: None,
                    error: Some(e.to_string()),
                },
                Err(_) => CallResult {
                    ok: false,
                    status: 0,
                    stream,
                    latency_s,
                    finish_s,
                    ttft_s: None,
                    error: Some("call timeout".to_string()),
                },
            }
        }));
    }
    let mut calls = Vec::with_capacity(tasks.len());
    for t in tasks {
        calls.push(t.await?);
    }
    let last_finish = calls.iter().map(|c| c.finish_s).fold(0.0, f64::max);
    let first_at = schedule
        .arrivals
        .first()
        .map_or(0.0, |a| a.at.as_secs_f64());
    let stats = stack.route_stats();
    Ok(json!({
        "contender": "tower-aoai Rust stack",
        "hits": hits.load(Ordering::Relaxed),
        "makespan_s": last_finish - first_at,
        "route": {
            "calls": stats.calls,
            "attempts": stats.attempts,
            "hedges": stats.hedges,
        },
        "calls": calls.iter().map(|c| json!({
            "ok": c.ok,
            "status": c.status,
            "stream": c.stream,
            "latency_s": c.latency_s,
            "ttft_s": c.ttft_s,
            "error": c.error,
        })).collect::<Vec<_>>(),
    }))
}
