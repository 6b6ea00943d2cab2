//! A burst of N concurrent calls through a limit of 4: the `Stack` (its own queue) against a bare
//! hyper client behind a `tokio::sync::Semaphore` of 4 (what a caller would write by hand), on
//! loopback against the zero-latency server, side by side in one run. The client's CPU time per
//! call should not grow with N (a queue that woke every queued call on every returned permit made
//! it O(N) per call).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::sync::Semaphore;
use tower::{BoxError, ServiceExt};
use tower_aoai::limit::AdaptiveConcurrencyLayer;
use tower_aoai::policy::route::Backend;
use tower_aoai::policy::{LimitConfig, PacingConfig};
use tower_aoai::stack::Stack;

use crate::overhead::{BODY, client, drain, thread_cpu, with_zero_server};

/// The limit both sides run under.
const LIMIT: u32 = 4;

/// One figure: CPU and wall time per call, for `calls` concurrent calls.
#[derive(Debug, Clone, Copy)]
pub struct Burst {
    /// The client thread's CPU time per call.
    pub cpu: Duration,
    /// Wall time per call.
    pub wall: Duration,
}

fn request(url: &str) -> Result<Request<Full<Bytes>>, BoxError> {
    Ok(Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(BODY)))?)
}

/// Runs the burst of `calls` through each side; returns (bare + semaphore, Stack).
async fn burst(addr: SocketAddr, calls: usize) -> Result<(Burst, Burst), BoxError> {
    let base = format!("http://{addr}");
    let url: Arc<str> =
        format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21").into();
    let bare = client();
    let gate = Arc::new(Semaphore::new(LIMIT as usize));
    let limit = LimitConfig::default()
        .with_initial(LIMIT)
        .with_min(LIMIT)
        .with_max(LIMIT);
    let layer = AdaptiveConcurrencyLayer::new(limit, PacingConfig::default())?
        .with_queue(calls.max(1), Duration::from_secs(600))?;
    let stack = Stack::builder()
        .backend(Backend::new("loopback", &base))
        .limit(layer)
        .build(client())?;

    let timed = async |side: usize| -> Result<Burst, BoxError> {
        let (cpu0, start) = (thread_cpu(), Instant::now());
        let mut tasks = Vec::with_capacity(calls);
        for _ in 0..calls {
            let req = request(&url)?;
            let (bare, gate, stack) = (bare.clone(), gate.clone(), stack.clone());
            tasks.push(tokio::spawn(async move {
                if side == 0 {
                    let _permit = gate.acquire_owned().await?;
                    drain(bare.request(req).await?).await
                } else {
                    drain(stack.oneshot(req).await?).await
                }
            }));
        }
        for task in tasks {
            task.await??;
        }
        let n = u32::try_from(calls).unwrap_or(u32::MAX);
        let cpu = match (cpu0, thread_cpu()) {
            (Some(a), Some(b)) => b.saturating_sub(a) / n,
            _ => Duration::ZERO,
        };
        Ok(Burst {
            cpu,
            wall: start.elapsed() / n,
        })
    };
    // Connections open and the Stack's limit warmed up before the figures.
    timed(0).await?;
    timed(1).await?;
    Ok((timed(0).await?, timed(1).await?))
}

/// Prints the table for each burst size in `sizes`.
pub fn run(sizes: &[usize]) -> Result<(), BoxError> {
    with_zero_server(|client_rt, addr| print_bursts(client_rt, addr, sizes))
}

fn print_bursts(
    client_rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    sizes: &[usize],
) -> Result<(), BoxError> {
    println!(
        "N concurrent calls through a limit of {LIMIT} · zero-latency hyper server on 127.0.0.1 · client thread CPU and wall time per call"
    );
    println!(
        "{:>7} | {:>26} {:>8} | {:>19} {:>8} | {:>9}",
        "calls", "bare + semaphore: CPU µs", "wall µs", "Stack: CPU µs", "wall µs", "CPU ratio"
    );
    for &calls in sizes {
        let (bare, stack) = client_rt.block_on(burst(addr, calls))?;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{calls:>7} | {:>26.1} {:>8.1} | {:>19.1} {:>8.1} | {:>8.2}x",
            us(bare.cpu),
            us(bare.wall),
            us(stack.cpu),
            us(stack.wall),
            us(stack.cpu) / us(bare.cpu).max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}
