//! The model behind a real HTTP/1.1 server on 127.0.0.1.
//!
//! One listener serves every resource of the scenario, each under its own URL prefix, so clients
//! address resources (and regions) as different base URLs:
//!
//! | URL                                                             | what                               |
//! |-----------------------------------------------------------------|------------------------------------|
//! | `/r/{resource}/openai/deployments/{d}/chat/completions`         | chat (also `/completions`, `/embeddings`) |
//! | `/r/{resource}/openai/v1/chat/completions`                      | v1 API, deployment in body `model` (also `/v1/completions`, `/v1/embeddings`, `/v1/responses`) |
//! | `/r/{resource}/openai/responses`                                | responses API, model in the body   |
//! | `/openai/...`                                                   | the same, for the scenario's first resource |
//! | `GET /_sim/stats`                                               | server counters as JSON            |
//!
//! [`ServerHandle::resource_url`] gives `http://127.0.0.1:{port}/r/{resource}`: the
//! `azure_endpoint` of `AzureOpenAI`, or with `/openai/v1` appended the `base_url` of `OpenAI`.
//! Auth is `api-key: KEY` or `Authorization: Bearer KEY`, checked against the resource's key.
//!
//! Time: the model runs on a virtual clock, `time_scale` (K) times faster than real time, and
//! every header is written in the client's real time, so a client that learns from them sees a
//! service with K times the scenario's quotas (see [`Model::set_time_scale`]):
//! - durations are divided by K: waits (latency, stream pacing) and the delays the server asks
//!   for (`retry-after-ms`, `retry-after`, `x-ratelimit-reset-requests`,
//!   `x-ratelimit-reset-tokens`, "retry after N seconds" in messages);
//! - rates are multiplied by K, because a real minute holds K virtual minutes:
//!   `x-ratelimit-limit-tokens` (tokens per real minute) and `x-ratelimit-limit-requests`
//!   (requests per real minute, or per real window as long as the admission window it reports,
//!   e.g. 20 per 10 s for 60 RPM over 10 s windows at K = 2);
//! - `x-ratelimit-remaining-tokens` is not scaled: it is what the token window admits now, and a
//!   client refilling it at the reported rate sees it refill as fast as it does;
//! - `x-ratelimit-remaining-requests` is the reported limit minus the requests admitted over that
//!   real window, so `limit - remaining` is the client's own recent sends, as at K = 1: that is how
//!   a client (tower-aoai's pacer) infers which window the limit counts. Unscaled, it would point
//!   to no window or the wrong one (a 1 s window read as 10 s: ten times too slow a pace).
//!
//! Admission is unchanged (the virtual windows decide); `azure-openai-deployment-utilization` is a
//! percentage and not scaled. With K = 1 every header is as the scenario says.
//!
//! Outages: a refused connection is a connection closed without a response as soon as the
//! request is read; a reset closes the connection after part of the answer (mid-stream for SSE,
//! before the headers otherwise).
//!
//! ```
//! use aoai_sim::{Scenario, Server, ServeOptions};
//!
//! let scenario = Scenario::from_toml(r#"
//!     [[regions]]
//!     name = "eastus2"
//!     [[resources]]
//!     name = "east"
//!     region = "eastus2"
//!     api_key = "k"
//!     [[resources.deployments]]
//!     name = "gpt-4o"
//!     tpm = 100000
//! "#).unwrap();
//! let server = Server::start(&scenario, ServeOptions::default()).unwrap();
//! assert!(server.resource_url("east").unwrap().starts_with("http://127.0.0.1:"));
//! assert_eq!(server.stats().requests, 0);
//! server.stop();
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Sleep;

use crate::model::{Model, Operation, SimBody, SimRequest, SimResponse, Stats};
use crate::scenario::{Scenario, ScenarioError};

/// Request bodies larger than this are refused with 413.
const MAX_REQUEST_BODY: usize = 16 * 1024 * 1024;

/// A request body must arrive within this time (a client that stalls gets 408).
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// How the server runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServeOptions {
    /// The port on 127.0.0.1 (0: any free port).
    pub port: u16,
    /// How much faster than real time the model's clock runs (1: real time).
    pub time_scale: f64,
    /// Worker threads of the server's runtime.
    pub threads: usize,
}

impl Default for ServeOptions {
    /// An ephemeral port, real time, two worker threads.
    fn default() -> Self {
        Self {
            port: 0,
            time_scale: 1.0,
            threads: 2,
        }
    }
}

/// Why the server could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// The scenario is invalid.
    Scenario(ScenarioError),
    /// `time_scale` or `threads` is out of range.
    Options(String),
    /// Binding or starting the runtime failed.
    Io(io::Error),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Scenario(e) => write!(f, "invalid scenario: {e}"),
            ServeError::Options(e) => write!(f, "invalid options: {e}"),
            ServeError::Io(e) => write!(f, "cannot serve: {e}"),
        }
    }
}

impl std::error::Error for ServeError {}

impl From<io::Error> for ServeError {
    fn from(e: io::Error) -> Self {
        ServeError::Io(e)
    }
}

/// State shared by every connection.
struct Shared {
    model: Mutex<Model>,
    start: Instant,
    time_scale: f64,
    first_resource: String,
}

impl Shared {
    fn model(&self) -> MutexGuard<'_, Model> {
        // A panic while holding the lock cannot leave the model half-updated in a way that matters
        // to a simulator: keep serving.
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn real(&self, virtual_time: Duration) -> Duration {
        virtual_time.div_f64(self.time_scale)
    }
}

/// The time scales a server accepts: from a million times slower than real time to a million
/// times faster (beyond, the real durations of the model's delays overflow or vanish).
fn check_time_scale(time_scale: f64) -> Result<(), ServeError> {
    if time_scale.is_finite() && (1e-6..=1e6).contains(&time_scale) {
        return Ok(());
    }
    Err(ServeError::Options(format!(
        "time_scale must be in [1e-6, 1e6], got {time_scale}"
    )))
}

/// Starts servers.
#[derive(Debug, Clone, Copy)]
pub struct Server;

impl Server {
    /// Binds 127.0.0.1:`port` and serves the scenario on a thread of its own, with its own tokio
    /// runtime (no ambient runtime needed). Stops when the handle is stopped or dropped.
    pub fn start(scenario: &Scenario, options: ServeOptions) -> Result<ServerHandle, ServeError> {
        check_time_scale(options.time_scale)?;
        if options.threads == 0 || options.threads > 64 {
            return Err(ServeError::Options(format!(
                "threads must be between 1 and 64, got {}",
                options.threads
            )));
        }
        let mut model = Model::new(scenario).map_err(ServeError::Scenario)?;
        model.set_time_scale(options.time_scale);
        let shared = Arc::new(Shared {
            model: Mutex::new(model),
            start: Instant::now(),
            time_scale: options.time_scale,
            first_resource: scenario.resources[0].name.clone(),
        });
        let listener = std::net::TcpListener::bind(("127.0.0.1", options.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.threads)
            .enable_all()
            .thread_name("aoai-sim")
            .build()?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let serving = shared.clone();
        let thread = thread::Builder::new()
            .name("aoai-sim-server".to_string())
            .spawn(move || {
                let result = runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    serve(listener, serving, async {
                        let _ = stop_rx.await;
                    })
                    .await;
                    Ok::<(), io::Error>(())
                });
                runtime.shutdown_background();
                result
            })?;
        Ok(ServerHandle {
            addr,
            shared,
            resources: scenario.resources.iter().map(|r| r.name.clone()).collect(),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

/// A running server. Dropping it stops the server.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    resources: Vec<String>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<io::Result<()>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("time_scale", &self.time_scale)
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:{port}`; `/openai/...` under it reaches the first resource.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:{port}/r/{resource}`: the resource's endpoint (`None` if unknown).
    pub fn resource_url(&self, resource: &str) -> Option<String> {
        self.resources
            .iter()
            .any(|r| r == resource)
            .then(|| format!("http://{}/r/{resource}", self.addr))
    }

    /// Server-side counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.model().stats().clone()
    }

    /// The model's virtual time now.
    pub fn virtual_now(&self) -> Duration {
        self.shared.start.elapsed().mul_f64(self.shared.time_scale)
    }

    /// Stops the server and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serves `listener` until `shutdown` completes (for callers already inside a tokio runtime).
pub async fn serve_scenario(
    listener: TcpListener,
    scenario: &Scenario,
    time_scale: f64,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    check_time_scale(time_scale)?;
    let mut model = Model::new(scenario).map_err(ServeError::Scenario)?;
    model.set_time_scale(time_scale);
    let shared = Arc::new(Shared {
        model: Mutex::new(model),
        start: Instant::now(),
        time_scale,
        first_resource: scenario.resources[0].name.clone(),
    });
    serve(listener, shared, shutdown).await;
    Ok(())
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            // Out of file descriptors and the like: back off a little instead of spinning.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(shared.clone(), req));
            // The timer bounds how long a client may take to send its request head.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A closed connection (refused or reset): the service errors and hyper drops the connection.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the simulated outage")
    }
}

impl std::error::Error for Dropped {}

/// An answer the server makes without the model (unknown route, bad method, body too large); it
/// carries the same identifying headers as the model's answers.
fn json_response(status: StatusCode, body: String) -> Response<SimHttpBody> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let id = format!("00000000-0000-4000-8000-{n:012x}");
    let mut r = Response::new(SimHttpBody::full(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(id) = HeaderValue::from_str(&id) {
        h.insert("apim-request-id", id.clone());
        h.insert("x-request-id", id);
    }
    h.insert("x-ms-region", HeaderValue::from_static(""));
    h.insert("x-ms-deployment-name", HeaderValue::from_static(""));
    r
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

/// Splits a path into (resource, operation, deployment).
fn route(path: &str, first: &str) -> Option<(String, Operation, Option<String>)> {
    let (resource, rest) = match path.strip_prefix("/r/") {
        Some(rest) => {
            let (res, tail) = rest.split_once('/')?;
            (res.to_string(), format!("/{tail}"))
        }
        None => (first.to_string(), path.to_string()),
    };
    let rest = rest.strip_prefix("/openai")?;
    let op = |name: &str| match name {
        "chat/completions" => Some(Operation::ChatCompletions),
        "completions" => Some(Operation::Completions),
        "embeddings" => Some(Operation::Embeddings),
        "responses" => Some(Operation::Responses),
        _ => None,
    };
    if let Some(tail) = rest.strip_prefix("/deployments/") {
        let (deployment, what) = tail.split_once('/')?;
        let operation = op(what).filter(|o| *o != Operation::Responses)?;
        return Some((resource, operation, Some(deployment.to_string())));
    }
    if let Some(what) = rest.strip_prefix("/v1/") {
        return Some((resource, op(what)?, None));
    }
    if rest == "/responses" {
        return Some((resource, Operation::Responses, None));
    }
    None
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<SimHttpBody>, Dropped> {
    let path = req.uri().path().to_string();
    if path == "/_sim/stats" && req.method() == Method::GET {
        return Ok(json_response(
            StatusCode::OK,
            stats_json(&shared.model().stats().clone()),
        ));
    }
    let Some((resource, operation, deployment)) = route(&path, &shared.first_resource) else {
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            r#"{"error":{"code":"404","message":"Resource not found"}}"#.to_string(),
        ));
    };
    if req.method() != Method::POST {
        return Ok(json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":{"code":"405","message":"Method not allowed"}}"#.to_string(),
        ));
    }
    let api_version = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("api-version="))
            .map(str::to_string)
    });
    let headers = req.headers();
    let api_key = header_str(headers, "api-key").or_else(|| {
        header_str(headers, "authorization").and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .map(|k| k.trim().to_string())
        })
    });
    let spillover_deployment = header_str(headers, "x-ms-spillover-deployment");
    let client_request_id = headers.get("x-ms-client-request-id").cloned();
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_REQUEST_BODY).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Err(_) => {
            return Ok(json_response(
                StatusCode::REQUEST_TIMEOUT,
                r#"{"error":{"code":"408","message":"The request body did not arrive in time"}}"#
                    .to_string(),
            ));
        }
        Ok(Err(_)) => {
            return Ok(json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                r#"{"error":{"code":"413","message":"Request body too large or unreadable"}}"#
                    .to_string(),
            ));
        }
    };
    let sim = SimRequest {
        resource,
        deployment,
        operation,
        api_version,
        api_key,
        spillover_deployment,
        body,
    };
    let response = {
        let mut model = shared.model();
        let now = shared.start.elapsed().mul_f64(shared.time_scale);
        model.handle(now, &sim)
    };
    let (answer, reset_after) = match response {
        SimResponse::Refused => return Err(Dropped),
        SimResponse::Answer(a) => (a, None),
        SimResponse::Reset {
            answer,
            after_chunks,
            at,
        } => {
            if after_chunks == 0 {
                sleep(shared.real(at)).await;
                return Err(Dropped);
            }
            (answer, Some(after_chunks))
        }
    };
    let timing = answer.timing;
    let body = match answer.body {
        SimBody::Full(bytes) => {
            sleep(shared.real(timing.total)).await;
            SimHttpBody::full(bytes)
        }
        SimBody::Stream(chunks) => {
            sleep(shared.real(timing.first_byte)).await;
            SimHttpBody::paced(chunks, shared.real(timing.per_chunk), reset_after)
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = answer.status;
    *response.headers_mut() = answer.headers;
    if let Some(id) = client_request_id {
        response.headers_mut().insert("x-ms-client-request-id", id);
    }
    Ok(response)
}

async fn sleep(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

fn stats_json(stats: &Stats) -> String {
    let by_deployment: serde_json::Map<String, serde_json::Value> = stats
        .by_deployment
        .iter()
        .map(|(k, v)| {
            let statuses: serde_json::Map<String, serde_json::Value> = v
                .iter()
                .map(|(s, n)| (s.to_string(), serde_json::json!(n)))
                .collect();
            (k.clone(), serde_json::Value::Object(statuses))
        })
        .collect();
    serde_json::json!({
        "requests": stats.requests,
        "by_deployment": by_deployment,
        "by_verdict": stats.by_verdict,
    })
    .to_string()
}

/// A response body: whole, or SSE chunks paced in real time (and possibly cut by a reset).
pub struct SimHttpBody {
    chunks: VecDeque<Bytes>,
    interval: Duration,
    /// Chunks left before a reset (`None`: no reset).
    reset_after: Option<usize>,
    timer: Option<Pin<Box<Sleep>>>,
    first: bool,
}

impl std::fmt::Debug for SimHttpBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHttpBody")
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
}

impl SimHttpBody {
    fn full(bytes: Bytes) -> Self {
        Self {
            chunks: VecDeque::from([bytes]),
            interval: Duration::ZERO,
            reset_after: None,
            timer: None,
            first: true,
        }
    }

    fn paced(chunks: Vec<Bytes>, interval: Duration, reset_after: Option<usize>) -> Self {
        Self {
            chunks: chunks.into(),
            interval,
            reset_after,
            timer: None,
            first: true,
        }
    }
}

impl Body for SimHttpBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.reset_after == Some(0) {
            // Wait a moment first so what was sent is flushed: the client sees part of the stream,
            // then the reset.
            let pause = this.interval.max(Duration::from_millis(1));
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(pause)));
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.timer = None;
            this.reset_after = None;
            this.chunks.clear();
            return Poll::Ready(Some(Err(Box::new(Dropped))));
        }
        if this.chunks.is_empty() {
            return Poll::Ready(None);
        }
        if !this.first && !this.interval.is_zero() {
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(this.interval)));
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.timer = None;
        }
        this.first = false;
        if let Some(n) = this.reset_after.as_mut() {
            *n -= 1;
        }
        match this.chunks.pop_front() {
            Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.reset_after.is_none_or(|n| n > 0)
    }

    fn size_hint(&self) -> SizeHint {
        if self.chunks.len() == 1 && self.reset_after.is_none() {
            SizeHint::with_exact(self.chunks[0].len() as u64)
        } else {
            SizeHint::default()
        }
    }
}
